"""A GGUF file written from a checkpoint too large to load: read a tensor, quantize it, write
it, go on.

The file is the one :func:`~bitalloc.export.gguf.export_gguf` writes from the same Hugging Face
Llama loaded whole (same metadata converted from the config and tokenizer, same tensors in the
same order, same bytes): the tensor infos are known before any weight is read (every type and
size follows from the allocation and the shapes), so the header is written first and each
tensor's bytes are appended as they are made. Peak memory is one tensor in float32 and its
quantized bytes; the embedding and the output head are read :data:`HEAD_ROWS` rows at a time
(llama.cpp's quantizers work row by row, so the bytes do not depend on the split). The file is
written under a temporary name, read back (every tensor's type, shape and bytes must be the
plan's) and only then renamed into place.

From a GGUF source, the file keeps the source's metadata and tensor order, copies the bytes of
every tensor that keeps its type, and warns when the allocated weights were already quantized,
as :func:`~bitalloc.export.gguf.export_gguf` does.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.export.base import ExportReport, check_export_path, importance_of, progress_iter
from bitalloc.export.gguf import (
    SUPPORTED_ARCHITECTURES,
    PlannedTensor,
    check_written,
    convention_type,
    encode_tensor,
    gguf_formats,
    gguf_param_names,
    llama_permute,
    new_writer,
    planned_bytes,
    requantize_warnings,
)
from bitalloc.export.gguf_convert import llama_metadata
from bitalloc.fileio import _fsync_directory
from bitalloc.importance import Importance
from bitalloc.streaming.export import streamable
from bitalloc.streaming.gguf_checkpoint import GGUFCheckpoint
from bitalloc.streaming.model import HEAD_ROWS, StreamedModel
from bitalloc.streaming.sources import open_checkpoint


def export_gguf_streamed(
    allocation,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool = True,
    workers: int = 0,
    ray_address: str | None = None,
) -> ExportReport:
    """Write ``allocation`` applied to the Hugging Face Llama checkpoint (or GGUF file) at
    ``source`` as a GGUF file at ``out`` (see the module docstring). ``workers`` > 0 quantizes
    the tensors on that many Ray workers (a local Ray, or the cluster at ``ray_address``),
    each reading its tensors from the checkpoint; the file is the same.

    Raises :class:`BitallocError`, with nothing written, when ``out`` exists and ``force`` is
    false, when a unit's format is not a ``gguf:`` type, when the allocation was made for
    another model, when the checkpoint has no tokenizer or is not a Llama that converts, or
    when the written file does not read back as planned."""
    out = check_export_path(out, force=force, directory=False)
    formats = gguf_formats(allocation)
    model = streamable(allocation, source)
    if isinstance(model.checkpoint, GGUFCheckpoint):
        metadata = model.checkpoint.reader
        plan = _plan_from_gguf(model, allocation, formats)
        warnings = tuple(requantize_warnings(metadata, [p for p, _ in plan]))
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
                planned_bytes(planned, formats),
                raw_dtype=gguf.GGMLQuantizationType[planned.type],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        encoded = _encoded_in_order(model, plan, importance, workers, ray_address)
        try:
            for data in progress_iter(encoded, "writing GGUF", progress, total=len(plan)):
                writer.write_tensor_data(data)
        finally:
            encoded.close()  # a Ray started for the export is shut down now, not at exit
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tensors = check_written(tmp, [p for p, _ in plan], formats)
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
    names = gguf_param_names(model.skeleton, "llama", len(model.layers))
    to_gguf = {p: g for g, p in names.items()}
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


class TensorEncoder:
    """Reads tensors of one checkpoint and encodes them as the file stores them: in this
    process, or as a Ray actor that opens the checkpoint itself (a worker reads only the
    tensors it is sent)."""

    def __init__(self, checkpoint: Any, config: Any = None):
        self.checkpoint = open_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        config = config if config is not None else self.checkpoint.hf_config()
        self.heads = {
            "attn_q": config.num_attention_heads,
            "attn_k": config.num_key_value_heads,
        }
        self.permuted = SUPPORTED_ARCHITECTURES[getattr(self.checkpoint, "arch", "llama")]

    def encode(self, planned: PlannedTensor, param: str, vector: torch.Tensor | None) -> np.ndarray:
        """The bytes of one tensor (``param`` "": the source's bytes, copied), quantized with
        the unit's importance ``vector`` as imatrix."""
        if not param:
            return self.checkpoint.raw_bytes(planned.name)
        value = self.checkpoint.tensor(param)
        kind = planned.name.split(".")[-2]
        if self.permuted and kind in self.heads:  # the whole matrix: rows move between blocks
            value = llama_permute(value.to(torch.float32), self.heads[kind])
        importance = None if vector is None else Importance({planned.unit: vector}, 0)
        rows = value.shape[0] if value.dim() > 1 else 1
        parts = []
        for start in range(0, rows, HEAD_ROWS):
            block = value[start : start + HEAD_ROWS] if value.dim() > 1 else value
            block = block.to(torch.float32)
            data, _ = encode_tensor(
                PlannedTensor(planned.name, planned.type, tuple(block.shape), planned.unit, block),
                importance,
            )
            parts.append(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _encoded_in_order(
    model: StreamedModel, plan, importance, workers: int, ray_address: str | None
) -> Iterator[np.ndarray]:
    """Each planned tensor's bytes, in the plan's order: encoded here, or on ``workers`` Ray
    actors with at most two tensors per worker in flight."""

    def vector(planned: PlannedTensor) -> torch.Tensor | None:
        return importance_of(importance, planned.unit) if planned.unit else None

    if not workers:
        encoder = TensorEncoder(model.checkpoint, model.config)
        for planned, param in plan:
            yield encoder.encode(planned, param, vector(planned))
        return
    from bitalloc.jobs import ray_session

    with ray_session(ray_address, workers) as ray:
        actor = ray.remote(num_cpus=1)(TensorEncoder)
        path = str(model.checkpoint.path)
        encoders = [actor.remote(path) for _ in range(workers)]
        pending: deque = deque()
        for k, (planned, param) in enumerate(plan):
            pending.append(encoders[k % workers].encode.remote(planned, param, vector(planned)))
            if len(pending) >= 2 * workers:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
