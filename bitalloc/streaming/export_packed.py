"""A packed model (:mod:`bitalloc.packed`) written from a checkpoint too large to load: each
layer's tensors are read, its units packed, and the packed tensors spooled to disk; the
``model.safetensors`` file is then assembled from the spool, tensor by tensor.

The directory is what :func:`~bitalloc.packed.save_packed` writes for the same allocation
applied in memory (``bitalloc apply``): the same tensors under the same names and dtypes (the
units packed, everything else in float32, a tied head stored once), the manifest with its
checksums, ``config.json`` and the tokenizer, so :func:`~bitalloc.packed.load_packed` and
``bitalloc generate`` load it as they load that one. Peak memory is one layer in float32 and
its packed form; the embedding and head are converted :data:`HEAD_ROWS` rows at a time. The
directory is filled under a temporary name and renamed into place only when complete.

Formats whose codes depend on the inputs' Gram matrices (``+gptq``, ``+rht``) get them as the
in-memory apply gathers them: the calibration windows run through the unquantized model, here
one layer at a time (the activations between layers held, as the streamed profile holds them),
each layer's matrices gathered just before its units are packed.

safetensors needs every tensor's offset in the header before the data, so the data go first
to a spool file and the header is written once the last layer is packed; the tensors are laid
out by element size, largest first, then by name, which keeps each one aligned to its element
size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.export.base import atomic_directory
from bitalloc.fileio import write_json_atomic
from bitalloc.formats import Format, parse_format
from bitalloc.formats.rotation import RotatedFormat
from bitalloc.importance import IMPORTANCE_TOKENS, Importance
from bitalloc.kernels.packing import PLANES
from bitalloc.kernels.quant_linear import Float16Linear, QuantLinear
from bitalloc.kernels.rotated import RotatedLinear
from bitalloc.models import Unit
from bitalloc.packed import (
    MANIFEST,
    PACKED_FORMAT,
    WEIGHTS,
    PackedManifest,
    PackedUnit,
    check_packed_target,
    manifest_digest,
    packed_layout,
)
from bitalloc.sensitivity.base import spread_windows
from bitalloc.sequential import merged
from bitalloc.streaming.export import copy_tokenizer, streamable
from bitalloc.streaming.model import (
    HEAD_ROWS,
    LayerInputs,
    StreamedModel,
    layer_importance,
    run_layer,
)

#: safetensors' names of the dtypes a packed model stores.
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: Bytes copied from the spool at a time while the weights file is assembled.
COPY_BYTES = 1 << 26


@dataclass(frozen=True)
class SpooledTensor:
    """Where a tensor's bytes lie in the spool file, and what safetensors records of it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def export_packed_streamed(
    allocation,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    calibration: torch.Tensor | None = None,
    tokens: int = IMPORTANCE_TOKENS,
    progress: bool = False,
) -> Path:
    """Write ``allocation`` applied to the checkpoint at ``source`` as a packed model in the
    directory ``out`` (see the module docstring); returns the directory. An existing packed
    model there is replaced; any other non-empty directory is refused.

    ``calibration`` (token ids, ``(n, seq_len)``) is needed when a format uses Gram matrices:
    the windows the allocation was made with (evenly spread ones up to ``tokens`` tokens are
    used, as :meth:`~bitalloc.allocation.Allocation.apply` uses them)."""
    model = streamable(allocation, source)
    formats = _packable_formats(allocation)
    directory = Path(out)
    check_packed_target(directory)
    recorded = allocation.importance()
    inputs = None
    # Without a recorded importance the run rounded plainly, and so does the in-memory apply.
    if recorded is not None and any(f.uses_gram for f in formats.values()):
        inputs = _gram_inputs(model, calibration, tokens)
    by_layer: dict[int, list] = {}
    for unit in allocation.data.units:
        by_layer.setdefault(unit.layer, []).append(unit)
    units: dict[str, PackedUnit] = {}
    unit_bytes = 0
    tied = _tied(model)
    try:
        with atomic_directory(directory) as tmp:
            spool_path = tmp / f".{WEIGHTS}.spool"
            spooled: list[SpooledTensor] = []
            with open(spool_path, "wb") as spool:
                outer = [
                    n
                    for n in model.skeleton.state_dict()
                    if not n.startswith("model.layers.") and n not in tied
                ]
                for name in outer:
                    spooled += _spool_rows(spool, name, model.checkpoint.tensor(name))
                bar = tqdm(
                    range(len(model.layers)), desc="packing", unit="layer", disable=not progress
                )
                for index in bar:
                    layer_units = by_layer.get(index, [])
                    with model.layer(index) as decoder_layer:
                        importance = recorded
                        if inputs is not None:
                            importance, inputs = _with_grams(
                                model, decoder_layer, layer_units, formats, recorded, inputs
                            )
                        prefix = f"model.layers.{index}."
                        values = {prefix + k: v for k, v in decoder_layer.state_dict().items()}
                        for unit in layer_units:
                            weights = None if importance is None else importance.of(unit.name)
                            packed = _spool_unit(spool, values, unit, formats[unit.name], weights)
                            units[unit.name], nbytes, tensors = packed
                            unit_bytes += nbytes
                            spooled += tensors
                        spooled += [_spool(spool, k, t) for k, t in values.items()]
                        del values
            digest = _assemble(tmp / WEIGHTS, spool_path, spooled)
            spool_path.unlink()
            config_text = model.config.to_json_string().encode()
            (tmp / "config.json").write_bytes(config_text)
            copy_tokenizer(model, tmp)
            manifest = PackedManifest(
                planes={str(b): p for b, p in PLANES.items()},
                units=units,
                tied=tied,
                weights_sha256=digest,
                unit_bytes=unit_bytes,
                predicted_unit_bytes=allocation.data.total_bits // 8,
                model_class=type(model.skeleton).__name__,
                allocation=allocation.to_json(),
                config_sha256=hashlib.sha256(config_text).hexdigest(),
            )
            data = manifest.model_dump(mode="json")
            data["manifest_sha256"] = manifest_digest(data)
            write_json_atomic(tmp / MANIFEST, data)
    except OSError as exc:
        raise BitallocError(f"cannot write {directory}: {exc.strerror or exc}") from None
    return directory


def _gram_inputs(
    model: StreamedModel, calibration: torch.Tensor | None, tokens: int
) -> LayerInputs:
    """The first layer's inputs for the evenly spread calibration windows."""
    if calibration is None or calibration.dim() != 2 or calibration.shape[0] == 0:
        raise BitallocError(
            "this allocation has formats whose codes depend on the Gram matrices of the "
            "calibration inputs (+gptq, +rht), which allocations do not store; pass "
            "calibration= (the calibration windows, (n, seq_len) token ids; `bitalloc apply "
            "--stream` passes the recorded text's)"
        )
    picks = spread_windows(len(calibration), int(calibration.shape[1]), tokens)
    return model.first_layer_inputs(calibration[picks])


def _with_grams(
    model: StreamedModel,
    layer: nn.Module,
    units,
    formats: dict[str, Format],
    recorded: Importance | None,
    inputs: LayerInputs,
) -> tuple[Importance, LayerInputs]:
    """The recorded importance with the Gram matrices of the layer's units that use them
    (gathered from ``inputs``, as :func:`~bitalloc.sequential.gram_importance` gathers them
    from the whole model), and the layer's unquantized outputs: the next layer's inputs."""
    named = [_unit(model, u.name) for u in units if formats[u.name].uses_gram]
    gathered = layer_importance(model, layer, named, inputs, grams=True) if named else None
    with torch.inference_mode():
        outputs = run_layer(layer, inputs)
    if gathered is None:
        return recorded, outputs
    return merged(recorded, gathered), outputs


def _unit(model: StreamedModel, name: str) -> Unit:
    return next(u for u in model.units if u.name == name)


def _packable_formats(allocation) -> dict[str, Format]:
    """The allocation's formats, each checked to be one the packed kernels run."""
    formats = {name: parse_format(f) for name, f in allocation.formats.items()}
    for name, fmt in formats.items():
        if packed_layout(fmt) is None:
            raise BitallocError(
                f"{name} is {fmt.name}, which bitalloc's packed kernels do not run (they run "
                "fp16 and formats stored as int codes: int, +gptq of int, +rht of those); "
                "export it with `bitalloc export --stream` (GGUF or compressed-tensors) instead"
            )
    return formats


def _tied(model: StreamedModel) -> dict[str, str]:
    """The head saved once under the embedding's name when the config ties them (as
    :func:`~bitalloc.packed.save_packed` finds the shared tensor)."""
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight": "model.embed_tokens.weight"}
    return {}


def _spool_unit(
    spool: IO[bytes],
    values: dict[str, torch.Tensor],
    unit,
    fmt: Format,
    weights: torch.Tensor | None,
) -> tuple[PackedUnit, int, list[SpooledTensor]]:
    """Pack one unit (its weight and bias taken out of ``values``) and spool its tensors: its
    manifest entry, its packed bytes and where its tensors lie."""
    layer = _packed_layer(values, unit.name, fmt, weights)
    entry = PackedUnit(format=fmt.name, shape=tuple(unit.shape), bias=f"{unit.name}.bias" in values)
    values.pop(f"{unit.name}.weight")
    values.pop(f"{unit.name}.bias", None)
    tensors = [_spool(spool, k, t) for k, t in layer.state_dict(prefix=f"{unit.name}.").items()]
    return entry, layer.nbytes, tensors


def _packed_layer(
    values: dict[str, torch.Tensor], name: str, fmt: Format, weights: torch.Tensor | None
) -> nn.Module:
    """The packed layer of unit ``name`` from its float32 weight (and bias) in ``values``, as
    :func:`~bitalloc.packed.pack_model` builds it."""
    weight = values[f"{name}.weight"]
    bias = values.get(f"{name}.bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    with torch.no_grad():
        if fmt.is_float:
            return Float16Linear.from_linear(linear)
        if isinstance(fmt, RotatedFormat):
            return RotatedLinear.from_linear(linear, fmt, weights)
        return QuantLinear.from_linear(linear, fmt, weights)


def _spool(spool: IO[bytes], name: str, tensor: torch.Tensor) -> SpooledTensor:
    """Append ``tensor``'s bytes to the spool."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype not in DTYPE_NAMES:
        raise BitallocError(f"{name} is {tensor.dtype}, which a packed model does not store")
    offset = spool.tell()
    spool.write(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return SpooledTensor(name, tensor.dtype, tuple(tensor.shape), offset, spool.tell() - offset)


def _spool_rows(spool: IO[bytes], name: str, stored: torch.Tensor) -> list[SpooledTensor]:
    """A tensor outside the layers as float32, :data:`HEAD_ROWS` rows at a time (the
    embedding and head are the largest tensors; their float32 copies are never whole)."""
    if not stored.is_floating_point():
        return [_spool(spool, name, stored)]
    offset = spool.tell()
    blocks = torch.split(stored, HEAD_ROWS) if stored.dim() > 1 else (stored,)
    for block in blocks:
        spool.write(block.to(torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    shape = tuple(stored.shape)
    return [SpooledTensor(name, torch.float32, shape, offset, spool.tell() - offset)]


def _assemble(path: Path, spool_path: Path, spooled: list[SpooledTensor]) -> str:
    """Write the safetensors file from the spool (header, then the data in safetensors'
    order); returns its SHA-256."""
    order = sorted(spooled, key=lambda t: (-t.dtype.itemsize, t.name))
    header: dict[str, object] = {"__metadata__": {"format": PACKED_FORMAT}}
    position = 0
    for t in order:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [position, position + t.nbytes],
        }
        position += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as out, open(spool_path, "rb") as spool:
        for chunk in (struct.pack("<Q", len(text)), text):
            out.write(chunk)
            digest.update(chunk)
        for t in order:
            for chunk in _ranges(spool, t.offset, t.nbytes):
                out.write(chunk)
                digest.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _ranges(spool: IO[bytes], offset: int, nbytes: int) -> Iterator[bytes]:
    """The spool's bytes ``[offset, offset + nbytes)`` in chunks of :data:`COPY_BYTES`."""
    done = 0
    while done < nbytes:
        chunk = os.pread(spool.fileno(), min(COPY_BYTES, nbytes - done), offset + done)
        if not chunk:
            raise BitallocError("the spool of the packed weights ended early; export again")
        yield chunk
        done += len(chunk)
