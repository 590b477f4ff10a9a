"""Packed models: an allocation applied for real, so quantized units hold only their budgeted
bytes, and saved as safetensors + JSON that reload without the full-precision weights.

A packed directory holds:

- ``model.safetensors``: every tensor of the model once (tied tensors once), units as
  ``<unit>.qweight`` / ``.scales`` / ``.zeros`` (``.weight`` in fp16 for ``fp16`` units;
  ``<unit>.inner.qweight`` etc. for a rotated unit, whose rotation is rebuilt from the seed in
  its format's name);
- ``bitalloc_packed.json``: the manifest (unit -> format and shape, the packing layout, tied
  tensors, the SHA-256 of the weights file and of ``config.json``, the allocation, and the
  SHA-256 of its own other fields), validated strictly on load;
- ``config.json`` (and ``generation_config.json``) of the Hugging Face model, and the
  tokenizer's files when a tokenizer was given.

The manifest is written last, so a save interrupted half-way leaves no directory that looks
complete; the checksums tie the manifest to the weights and config it was written with, and to
itself, so an edited or damaged file raises instead of loading a different model. The planes
layout on disk does not depend on the CPU: torch's int4 order, which does, is made at load.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json_object, read_model, write_atomic, write_json_atomic
from bitalloc.formats import Format, QuantFormat, parse_format
from bitalloc.formats.rotation import RotatedFormat
from bitalloc.kernels.packing import PLANES, check_packed, packed_nbytes
from bitalloc.kernels.paths import (
    CPU_POLICIES as CPU_POLICIES,
)
from bitalloc.kernels.paths import (
    CpuPathChoice,
    check_policy,
    choose_cpu_paths,
    packed_layers,
)
from bitalloc.kernels.paths import (
    cpu_path_report as cpu_path_report,
)
from bitalloc.kernels.quant_linear import Float16Linear, QuantLinear, int_layout
from bitalloc.kernels.rotated import INNER, RotatedLinear
from bitalloc.models import get_linear

if TYPE_CHECKING:
    from bitalloc.importance import Importance

MANIFEST = "bitalloc_packed.json"
WEIGHTS = "model.safetensors"
PACKED_FORMAT = "bitalloc-packed"
# Version 2 adds the manifest's own checksum and config.json's; version 1 files still load.
PACKED_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackedUnit(_Strict):
    """One unit of a packed model: its format, weight shape and whether it has a bias."""

    format: str
    shape: tuple[int, int]
    bias: bool = False


class PackedManifest(_Strict):
    """The JSON written beside the tensors of a packed model."""

    format: Literal["bitalloc-packed"] = PACKED_FORMAT
    version: Literal[1, 2] = PACKED_VERSION
    layout: Literal["planes"] = "planes"
    planes: dict[str, tuple[int, ...]]
    units: dict[str, PackedUnit]
    tied: dict[str, str] = {}
    weights_sha256: str
    unit_bytes: int
    predicted_unit_bytes: int
    model_class: str
    allocation: dict[str, Any] | None = None
    config_sha256: str | None = None
    # SHA-256 of the canonical JSON of every other field: any edit of the file is detected.
    manifest_sha256: str | None = None


# --- building --------------------------------------------------------------------------------
def pack_model(
    model: nn.Module,
    formats: Mapping[str, str | Format],
    *,
    inplace: bool = False,
    cpu_path: str = "auto",
    progress: bool = True,
    importance: Importance | None = None,
) -> nn.Module:
    """Replace each named ``nn.Linear`` by a :class:`QuantLinear` (or :class:`Float16Linear` for
    ``fp16``) holding its quantized weight, then choose CPU paths (see :func:`choose_cpu_paths`).

    Formats stored as int codes run: ``int{b}-g{g}``, and any format with an int layout (an
    ``int_format`` and a ``quantize``, see :func:`~bitalloc.kernels.quant_linear.int_layout`,
    e.g. ``+gptq``), whose own quantizer chooses the codes. A rotated format (``+rht``) of such
    a format becomes a :class:`~bitalloc.kernels.rotated.RotatedLinear` around such a layer.

    Every name and format is checked before anything changes; a deep copy is packed unless
    ``inplace``. ``progress`` shows a bar per unit (stderr). ``importance`` weights each unit's
    clipping search (pass the allocation's, so the packed weights are the measured ones).
    """
    check_policy(cpu_path)
    resolved = [(name, get_linear(model, name), parse_format(f)) for name, f in formats.items()]
    if not resolved:
        raise BitallocError("nothing to pack: the allocation names no unit")
    for name, linear, fmt in resolved:
        if packed_layout(fmt) is None:
            raise BitallocError(
                f"{name} is {fmt.name}, which bitalloc's packed kernels do not run (they run "
                "fp16 and formats stored as int codes: int, +gptq of int, +rht of those); "
                "apply the allocation without packing (fake-quantized weights)"
            )
        fmt.check_shape((linear.out_features, linear.in_features))
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, _, fmt in tqdm(resolved, desc="packing", unit="unit", disable=not progress):
            linear = get_linear(target, name)
            weights = None if importance is None else importance.of(name)
            layer: nn.Module
            if fmt.is_float:
                layer = Float16Linear.from_linear(linear)
            elif isinstance(fmt, RotatedFormat):
                layer = RotatedLinear.from_linear(linear, fmt, weights)
            else:
                layer = QuantLinear.from_linear(linear, fmt, weights)
            _replace(target, name, layer)
    choose_cpu_paths(target, cpu_path, progress=progress)
    return target


def packed_layout(fmt: Format) -> QuantFormat | None:
    """The layout a packed unit stores ``fmt`` in (``fp16``, or an int format), or None when
    the packed kernels cannot run it."""
    if isinstance(fmt, QuantFormat):
        return fmt
    if isinstance(fmt, RotatedFormat):
        return fmt.stored_int_format
    return int_layout(fmt)


UnitLayer = QuantLinear | Float16Linear | RotatedLinear


def packed_units(model: nn.Module) -> dict[str, UnitLayer]:
    """The packed units of ``model`` by unit name, in network order: like
    :func:`~bitalloc.kernels.paths.packed_layers`, but a rotated unit is its
    :class:`RotatedLinear` (whose inner :class:`QuantLinear`, ``<unit>.inner``, is part of it
    and not listed)."""
    units: dict[str, UnitLayer] = {}
    inner: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, RotatedLinear):
            units[name] = module
            inner.add(f"{name}.{INNER}" if name else INNER)
        elif isinstance(module, QuantLinear | Float16Linear) and name not in inner:
            units[name] = module
    return units


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, layer)


# --- sizes -------------------------------------------------------------------------------------
def unit_bytes(model: nn.Module) -> int:
    """Bytes held by the packed units' weights (codes, scales, zeros, fp16 weights)."""
    return sum(layer.nbytes for layer in packed_layers(model).values())


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters and buffers, each storage once: ``units`` (packed unit
    weights), ``other`` (everything else, biases included) and ``total``."""
    units = unit_bytes(model)
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return {"units": units, "other": total - units, "total": total}


def last_paths(model: nn.Module) -> dict[str, int]:
    """How many packed units ran on each path in their last call."""
    out: dict[str, int] = defaultdict(int)
    for layer in packed_layers(model).values():
        if layer.last_path is not None:
            out[layer.last_path] += 1
    return dict(sorted(out.items()))


# --- saving ------------------------------------------------------------------------------------
def save_packed(
    model: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    allocation: Any = None,
) -> Path:
    """Write a packed model (see the module docstring) to ``directory``; returns the directory.

    ``allocation`` (an :class:`~bitalloc.allocation.Allocation`) is recorded in the manifest and
    its predicted bytes are compared with the tensors.
    """
    from safetensors.torch import save

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise BitallocError(
            "save_packed needs a Hugging Face model (with a .config) so that it can be rebuilt"
        )
    layers = packed_units(model)
    if not layers:
        raise BitallocError("the model has no packed units; pack it with alloc.apply(packed=True)")
    directory = Path(directory)
    check_packed_target(directory)
    tensors, tied = _unique_state(model)
    blob = save(tensors, metadata={"format": PACKED_FORMAT})
    config_text = config.to_json_string().encode()
    units = {
        name: PackedUnit(format=layer.format.name, shape=layer.shape, bias=layer.bias is not None)
        for name, layer in layers.items()
    }
    predicted = sum(
        packed_nbytes(u.shape, packed_layout(parse_format(u.format))) for u in units.values()
    )
    manifest = PackedManifest(
        planes={str(b): p for b, p in PLANES.items()},
        units=units,
        tied=tied,
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        unit_bytes=unit_bytes(model),
        predicted_unit_bytes=(
            allocation.data.total_bits // 8 if allocation is not None else predicted
        ),
        model_class=type(model).__name__,
        allocation=allocation.to_json() if allocation is not None else None,
        config_sha256=hashlib.sha256(config_text).hexdigest(),
    )
    data = manifest.model_dump(mode="json")
    data["manifest_sha256"] = manifest_digest(data)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / WEIGHTS, lambda handle: handle.write(blob))
    write_atomic(directory / "config.json", lambda h: h.write(config_text))
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        text = generation.to_json_string().encode()
        write_atomic(directory / "generation_config.json", lambda h: h.write(text))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    write_json_atomic(directory / MANIFEST, data)
    return directory


def manifest_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's fields but its own checksum, as canonical JSON (so whitespace
    and key order do not matter, every value does)."""
    rest = {k: v for k, v in data.items() if k != "manifest_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_packed_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise BitallocError(f"{directory} is a file; give a directory for the packed model")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise BitallocError(
            f"{directory} is not empty and holds no packed model; choose a new or empty "
            "directory (an existing packed model there would be replaced)"
        )


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once, and the aliases left out -> their source."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, tied


# --- loading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedModel:
    """A loaded packed model, its tokenizer (None when none was saved) and its manifest."""

    model: nn.Module
    tokenizer: Any
    manifest: PackedManifest
    cpu_paths: CpuPathChoice


def read_manifest(directory: str | Path) -> PackedManifest:
    """Read and validate ``bitalloc_packed.json``: schema, its own checksum, plane layout and
    unit formats."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise BitallocError(
            f"{directory} holds no packed model ({MANIFEST} is missing); write one with "
            "`bitalloc apply --allocation alloc.json --out DIR`"
        )
    manifest = read_model(path, PackedManifest, "packed model manifest")
    again = "write the packed model again with `bitalloc apply`"
    if manifest.version >= 2:
        if manifest.manifest_sha256 is None or manifest.config_sha256 is None:
            raise BitallocError(f"{path} lacks its checksums; {again}")
        if manifest_digest(read_json_object(path, "packed model manifest")) != (
            manifest.manifest_sha256
        ):
            raise BitallocError(
                f"{path} was modified after it was written (manifest_sha256 does not match its "
                f"contents); {again}"
            )
    if manifest.planes != {str(b): p for b, p in PLANES.items()}:
        raise BitallocError(f"{path} uses another bit-plane layout than this bitalloc reads")
    for name, unit in manifest.units.items():
        try:
            fmt = parse_format(unit.format)
        except BitallocError as exc:
            raise BitallocError(f"{path}: unit {name!r}: {exc}") from None
        if fmt.name != unit.format:
            raise BitallocError(f"{path}: unit {name!r} names {unit.format!r}, not {fmt.name!r}")
    return manifest


def load_packed(
    directory: str | Path, *, cpu_path: str = "auto", progress: bool = True
) -> PackedModel:
    """Rebuild a model saved by :func:`save_packed`: skeleton from ``config.json``, packed units
    from the manifest, tensors from ``model.safetensors`` (each checked against the manifest),
    then CPU paths (``progress`` shows a bar while they are chosen)."""
    from safetensors.torch import load

    check_policy(cpu_path)
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise BitallocError(f"{directory} has a manifest but no {WEIGHTS}; save the model again")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest.weights_sha256:
        raise BitallocError(
            f"{weights} is not the file its manifest was written with (SHA-256 differs); "
            "the directory was modified or a save was interrupted: save the model again"
        )
    try:
        tensors = load(blob)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise BitallocError(
            f"{weights} is not a readable safetensors file ({exc}); save the model again"
        ) from None
    model = _skeleton(directory, manifest)
    for name, unit in manifest.units.items():
        _install_unit(model, name, unit, tensors)
    if unit_bytes(model) != manifest.unit_bytes:
        raise BitallocError(
            f"the packed units hold {unit_bytes(model):,} bytes but the manifest records "
            f"{manifest.unit_bytes:,}; save the model again"
        )
    _load_rest(model, tensors, manifest, directory)
    choice = choose_cpu_paths(model, cpu_path, progress=progress)
    return PackedModel(model, _load_tokenizer(directory), manifest, choice)


def _skeleton(directory: Path, manifest: PackedManifest) -> nn.Module:
    """The model of ``config.json``, uninitialised, after checking the file against the
    manifest."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise BitallocError(f"{directory} lacks config.json; save the model again")
    digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
    if manifest.config_sha256 is not None and digest != manifest.config_sha256:
        raise BitallocError(
            f"{config_path} is not the file its manifest was written with (SHA-256 differs); "
            "save the model again"
        )
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with _no_init():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for a config it cannot use
        raise BitallocError(
            f"{config_path} does not describe a model transformers can build ({exc}); save the "
            "model again"
        ) from None
    if type(model).__name__ != manifest.model_class:
        raise BitallocError(
            f"config.json builds a {type(model).__name__}, but the manifest was written for a "
            f"{manifest.model_class}; the files belong to different models"
        )
    model.eval()
    return model


def _install_unit(
    model: nn.Module, name: str, unit: PackedUnit, tensors: Mapping[str, torch.Tensor]
) -> None:
    fmt = parse_format(unit.format)
    layout = packed_layout(fmt)
    if layout is None:
        raise BitallocError(
            f"packed unit {name!r} is {fmt.name}, which packed models cannot hold; save the "
            "model again"
        )
    try:
        linear = get_linear(model, name)
    except BitallocError:
        raise BitallocError(
            f"packed unit {name!r} is not a Linear layer of the model config.json describes"
        ) from None
    out_features, in_features = unit.shape
    if (linear.out_features, linear.in_features) != (out_features, in_features):
        raise BitallocError(
            f"packed unit {name!r} is {unit.shape} in the manifest but "
            f"{(linear.out_features, linear.in_features)} in config.json"
        )
    rotated = isinstance(fmt, RotatedFormat)
    if rotated:
        try:
            fmt.check_shape(unit.shape)
        except BitallocError as exc:
            raise BitallocError(f"packed unit {name!r}: {exc}") from None
    # A rotated unit's tensors belong to its inner layer: <unit>.inner.qweight, ...
    sub = f"{INNER}." if rotated else ""
    names = ["weight"] if fmt.is_float else ["qweight", "scales", "zeros"]
    names += ["bias"] if unit.bias else []
    stored = [sub + n for n in names]
    missing = [n for n in stored if f"{name}.{n}" not in tensors]
    if missing:
        raise BitallocError(f"{WEIGHTS} lacks {name}.{missing[0]} that the manifest requires")
    prefix = f"{name}."
    extra = sorted(k for k in tensors if k.startswith(prefix) and k[len(prefix) :] not in stored)
    if extra:
        # A tensor the manifest does not account for (a bias it says is absent) would be dropped.
        raise BitallocError(f"{WEIGHTS} holds {extra[0]}, which the manifest's {name!r} lacks")
    t = {n: tensors[f"{name}.{sub}{n}"] for n in names}
    if fmt.is_float:
        if t["weight"].dtype != torch.float16 or tuple(t["weight"].shape) != unit.shape:
            raise BitallocError(
                f"{name}.weight is {t['weight'].dtype} {tuple(t['weight'].shape)}; the manifest "
                f"says fp16 {unit.shape}"
            )
        layer: UnitLayer = Float16Linear(in_features, out_features, bias=unit.bias)
        layer.weight = t["weight"]
    else:
        try:
            check_packed(
                t["qweight"], t["scales"], t["zeros"], layout.bits, layout.group_size, in_features
            )
        except BitallocError as exc:
            raise BitallocError(
                f"packed unit {name!r} does not match its manifest ({fmt.name}, {unit.shape}): "
                f"{exc}"
            ) from None
        if t["qweight"].shape[0] != out_features:
            raise BitallocError(
                f"{name}.{sub}qweight has {t['qweight'].shape[0]} rows, not {out_features}"
            )
        quant = QuantLinear(
            in_features,
            out_features,
            layout.bits,
            layout.group_size,
            bias=unit.bias,
            fmt=fmt.base if rotated else fmt,
        )
        quant.qweight, quant.scales, quant.zeros = t["qweight"], t["scales"], t["zeros"]
        layer = quant
    if unit.bias:
        if tuple(t["bias"].shape) != (out_features,):
            raise BitallocError(f"{name}.{sub}bias has shape {tuple(t['bias'].shape)}")
        layer.bias = t["bias"]
    if rotated:
        layer = RotatedLinear(layer, fmt)
    _replace(model, name, layer)


def _load_rest(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    manifest: PackedManifest,
    directory: Path,
) -> None:
    expected = model.state_dict()
    for alias, source in manifest.tied.items():
        # An alias is a tensor of the model saved once, under its source's name: never stored
        # itself, and its source is a stored tensor of the same shape.
        if (
            alias not in expected
            or alias in tensors
            or source not in tensors
            or tuple(expected[alias].shape) != tuple(tensors[source].shape)
        ):
            raise BitallocError(
                f"the manifest ties {alias!r} to {source!r}, which {WEIGHTS} and the model of "
                "config.json do not allow; save the model again"
            )
    unit_keys = {k for k in tensors if any(k.startswith(f"{u}.") for u in manifest.units)}
    rest = {k: v for k, v in tensors.items() if k not in unit_keys}
    unexpected = sorted(set(rest) - set(expected))
    if unexpected:
        raise BitallocError(
            f"{directory / WEIGHTS} holds {unexpected[0]!r}, which the model of config.json does "
            "not have; the files belong to different models"
        )
    for key, value in rest.items():
        want = expected[key]
        if tuple(want.shape) != tuple(value.shape):
            raise BitallocError(
                f"{key} is {tuple(value.shape)} in {WEIGHTS} but {tuple(want.shape)} in the model "
                "of config.json"
            )
    missing = sorted(set(expected) - set(tensors) - set(manifest.tied))
    if missing:
        raise BitallocError(f"{directory / WEIGHTS} lacks {missing[0]!r}; save the model again")
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for key, value in rest.items():
            target = params.get(key, buffers.get(key))
            if target is None:
                continue
            if target.dtype != value.dtype:
                target.data = value.clone()
            else:
                target.copy_(value)
        for alias, source in manifest.tied.items():
            src = params.get(source, buffers.get(source))
            owner_name, _, attr = alias.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if src is None or getattr(owner, attr, None) is None:
                raise BitallocError(
                    f"the manifest ties {alias!r} to {source!r}, which the model of config.json "
                    "does not have"
                )
            # Share the very tensor (as the saved model did), not a copy of its values.
            setattr(owner, attr, src)


def _load_tokenizer(directory: Path) -> Any:
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # tokenizers and transformers raise many types for damaged files
        raise BitallocError(
            f"the tokenizer files in {directory} cannot be read ({exc}); save the model again"
        ) from None


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation while the skeleton is built: every tensor is loaded after."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        yield
        return
    with no_init_weights():
        yield
