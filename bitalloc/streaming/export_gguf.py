"""A GGUF file written from a checkpoint too large to load: read a tensor, quantize it, write
it, go on.

From a GGUF source, the file keeps the source's metadata and tensor order, copies the bytes of
every tensor that keeps its type, and warns when the allocated weights were already quantized,
as :func:`~bitalloc.export.gguf.export_gguf` does.

The file is the one :func:`~bitalloc.export.gguf.export_gguf` writes from the same Hugging Face
Llama loaded whole (same metadata converted from the config and tokenizer, same tensors in the
same order, same bytes): the tensor infos are known before any weight is read (every type and
size follows from the allocation and the shapes), so the header is written first and each
tensor's bytes are appended as they are made. Peak memory is one tensor in float32 and its
quantized bytes; the embedding and the output head are read :data:`HEAD_ROWS` rows at a time
(llama.cpp's quantizers work row by row, so the bytes do not depend on the split). The file is
written under a temporary name, read back (every tensor's type, shape and bytes must be the
plan's) and only then renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.export.base import ExportReport, check_export_path, progress_iter
from bitalloc.export.gguf import (
    SUPPORTED_ARCHITECTURES,
    PlannedTensor,
    _check_written,
    _encode,
    _gguf_formats,
    _hf_names,
    _planned_bytes,
    _requantize_warnings,
    convention_type,
    llama_permute,
    new_writer,
)
from bitalloc.export.gguf_convert import llama_metadata
from bitalloc.fileio import _fsync_directory
from bitalloc.streaming.export import streamable
from bitalloc.streaming.gguf_checkpoint import GGUFCheckpoint
from bitalloc.streaming.model import HEAD_ROWS, StreamedModel


def export_gguf_streamed(
    allocation,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write ``allocation`` applied to the Hugging Face Llama checkpoint at ``source`` as a
    GGUF file at ``out`` (see the module docstring).

    Raises :class:`BitallocError`, with nothing written, when ``out`` exists and ``force`` is
    false, when a unit's format is not a ``gguf:`` type, when the allocation was made for
    another model, when the checkpoint has no tokenizer or is not a Llama that converts, or
    when the written file does not read back as planned."""
    out = check_export_path(out, force=force, directory=False)
    formats = _gguf_formats(allocation)
    model = streamable(allocation, source)
    if isinstance(model.checkpoint, GGUFCheckpoint):
        metadata = model.checkpoint.reader
        plan = _plan_from_gguf(model, allocation, formats)
        warnings = tuple(_requantize_warnings(metadata, [p for p, _ in plan]))
    else:
        metadata = llama_metadata(
            model.config, model.checkpoint.tokenizer("(a GGUF file carries it)")
        )
        plan = _plan(model, allocation, formats)
        warnings = metadata.notes
    importance = allocation.importance()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = new_writer(tmp, metadata, allocation, formats)
        for planned, _ in plan:
            writer.add_tensor_info(
                planned.name,
                planned.shape,
                np.dtype(np.float32),
                _planned_bytes(planned, formats),
                raw_dtype=gguf.GGMLQuantizationType[planned.type],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned, param in progress_iter(plan, "writing GGUF", progress):
            writer.write_tensor_data(_encoded(model, planned, param, importance))
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tensors = _check_written(tmp, [p for p, _ in plan], formats)
        os.replace(tmp, out)
        _fsync_directory(out.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BitallocError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise
    return ExportReport(out, "gguf", tensors, out.stat().st_size, warnings)


def _plan(model: StreamedModel, allocation, formats) -> list[tuple[PlannedTensor, str]]:
    """Every tensor of the file (in the skeleton's parameter order: embedding, layers, final
    norm, head) with its type and shape, beside the checkpoint tensor it is made from."""
    to_gguf = {p: g for g, p in _hf_names(model.skeleton, "llama", len(model.layers)).items()}
    unit_of = {f"{u.name}.weight": u.name for u in allocation.data.units}
    params = dict(model.skeleton.named_parameters())  # tied parameters are listed once
    unnamed = [p for p in params if p not in to_gguf]
    if unnamed:
        raise BitallocError(
            f"cannot name parameter {unnamed[0]!r} in llama.cpp's GGUF naming; convert the "
            "model with llama.cpp's convert_hf_to_gguf.py"
        )
    has_output = "output.weight" in to_gguf.values()
    plan = []
    for param, value in params.items():
        name, shape, unit = to_gguf[param], tuple(value.shape), unit_of.get(param)
        kind = formats[unit].type if unit else convention_type(name, shape, has_output)
        plan.append((PlannedTensor(name, kind, shape, unit, None), param))
    return plan


def _plan_from_gguf(model: StreamedModel, allocation, formats) -> list[tuple[PlannedTensor, str]]:
    """The source file's tensors in its order: units in their allocated types; the rest in
    llama.cpp's convention (:func:`convention_type`), their bytes copied where the source
    already stores that type (the model's values are those bytes, dequantized) or they are
    tensors the model computes itself (rope factors); the checkpoint tensor each is made
    from ("" for a copy)."""
    checkpoint: GGUFCheckpoint = model.checkpoint
    param_of = {info.shard: name for name, info in checkpoint.tensors.items()}
    unit_of = {f"{u.name}.weight": u.name for u in allocation.data.units}
    has_output = any(t.name == "output.weight" for t in checkpoint.reader.tensors)
    plan = []
    for tensor in checkpoint.reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        stored = tensor.tensor_type.name
        param = param_of.get(tensor.name)
        unit = unit_of.get(param or "")
        if unit is not None:
            plan.append((PlannedTensor(tensor.name, formats[unit].type, shape, unit, None), param))
            continue
        wanted = convention_type(tensor.name, shape, has_output) if param else stored
        source = "" if wanted == stored else param
        plan.append((PlannedTensor(tensor.name, wanted, shape, None, None), source))
    return plan


def _encoded(model: StreamedModel, planned: PlannedTensor, param: str, importance) -> np.ndarray:
    """The bytes of one tensor as the file stores them (``param`` "": the source's bytes)."""
    if not param:
        return model.checkpoint.raw_bytes(planned.name)
    value = model.checkpoint.tensor(param)
    kind = planned.name.split(".")[-2]
    heads = {
        "attn_q": model.config.num_attention_heads,
        "attn_k": model.config.num_key_value_heads,
    }
    permuted = SUPPORTED_ARCHITECTURES[getattr(model.checkpoint, "arch", "llama")]
    if permuted and kind in heads:  # the whole matrix: the permutation moves rows between blocks
        value = llama_permute(value.to(torch.float32), heads[kind])
    rows = value.shape[0] if value.dim() > 1 else 1
    parts = []
    for start in range(0, rows, HEAD_ROWS):
        block = value[start : start + HEAD_ROWS] if value.dim() > 1 else value
        block = block.to(torch.float32)
        data, _ = _encode(
            PlannedTensor(planned.name, planned.type, tuple(block.shape), planned.unit, block),
            importance,
        )
        parts.append(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
