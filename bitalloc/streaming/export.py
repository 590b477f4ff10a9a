"""A compressed-tensors checkpoint written from a checkpoint too large to load: read a layer's
tensors, compress its units, write the layer's shard, go on.

The directory is what :func:`~bitalloc.export.compressed_tensors.export_compressed_tensors`
writes (same tensors, names, dtypes, config and quantization config), in one shard per decoder
layer plus one for the embedding, final norm and head, with ``model.safetensors.index.json``:
transformers and vLLM read sharded checkpoints through the index. Peak memory is one layer in
float32 plus its compressed form. With ``workers``, the layers are compressed on that many Ray
workers, each reading its layer from the checkpoint itself, and written here in order (at most
two layers per worker in flight); the shards are the same. Each shard is read back and checked
as the in-memory export checks its file; the directory is filled under a temporary name and
renamed into place only when complete. The source's tokenizer files, when it has them, are copied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from bitalloc.errors import BitallocError
from bitalloc.export.base import ExportReport, atomic_directory, check_export_path
from bitalloc.export.compressed_tensors import (
    EXPORT_DTYPE,
    _check_written,
    _export_formats,
    _mixed_group_warnings,
    _quantization_config,
    _shared_global_scales,
    _shared_scale_warnings,
    _write_config,
)
from bitalloc.fileio import write_atomic
from bitalloc.formats.ct import CTFormat
from bitalloc.streaming.checkpoint import INDEX
from bitalloc.streaming.model import StreamedModel

#: Files of a Hugging Face tokenizer copied from the source when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def export_compressed_tensors_streamed(
    allocation,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    workers: int = 0,
    ray_address: str | None = None,
) -> ExportReport:
    """Write ``allocation`` applied to the checkpoint at ``source`` as a sharded
    compressed-tensors checkpoint at ``out`` (see the module docstring); ``workers`` > 0
    compresses the layers on that many Ray workers (a local Ray, or the cluster at
    ``ray_address``)."""
    formats = _export_formats(allocation)
    path = check_export_path(out, force=force, directory=True)
    model = streamable(allocation, source)
    units = allocation.data.units
    by_layer: dict[int, list] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    weight_map: dict[str, str] = {}
    shared_groups: list[int] = []
    report = []
    total_bytes = 0
    try:
        with atomic_directory(path) as tmp:
            shell = {
                name: _stored(model.checkpoint.tensor(name))
                for name in model.checkpoint.names()
                if not name.startswith("model.layers.")
            }
            total_bytes += _write_shard(tmp, "model-outer.safetensors", shell, weight_map)
            layers = [(index, by_layer.get(index, [])) for index in range(len(model.layers))]
            compressed = _compressed_in_order(model, layers, formats, workers, ray_address)
            try:
                for (index, layer_units), (blob, names, groups) in zip(layers, compressed):
                    shared_groups.append(groups)
                    shard = f"model-layer-{index:05d}.safetensors"
                    (tmp / shard).write_bytes(blob)
                    total_bytes += len(blob)
                    weight_map.update(dict.fromkeys(names, shard))
                    del blob
                    written = _check_written(tmp / shard, layer_units, formats)
                    report += [t for t in written if t.unit]
            finally:
                compressed.close()  # a Ray started for the export is shut down now
            index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            write_atomic(
                tmp / INDEX, lambda fh: fh.write(json.dumps(index_json, indent=1).encode())
            )
            _write_config(model.skeleton, tmp, _quantization_config(model.skeleton, units, formats))
            copy_tokenizer(model, tmp)
    except OSError as exc:
        raise BitallocError(f"cannot write {path}: {exc.strerror or exc}") from None
    warnings = _mixed_group_warnings(units, formats) + _shared_scale_warnings(sum(shared_groups))
    return ExportReport(path, "compressed-tensors", tuple(report), total_bytes, tuple(warnings))


def copy_tokenizer(model: StreamedModel, directory: Path) -> None:
    """The source's tokenizer files into ``directory`` (a GGUF source's tokenizer, converted)."""
    if model.checkpoint.path.is_file():
        model.checkpoint.tokenizer().save_pretrained(directory)
        return
    for name in TOKENIZER_FILES:
        if (model.checkpoint.path / name).is_file():
            shutil.copyfile(model.checkpoint.path / name, directory / name)


def streamable(allocation, source: str | os.PathLike[str]) -> StreamedModel:
    """The checkpoint at ``source`` as a :class:`StreamedModel`, checked to be the model
    ``allocation`` was made for (every unit is one of its units, of the same shape), and the
    allocation checked to need nothing but the stored weights (no scale folding)."""
    if allocation.data.scale_folding is not None:
        raise BitallocError(
            "this allocation folded scales into the weights it measured; a streamed export "
            "reads the checkpoint as stored: allocate without scale folding"
        )
    model = StreamedModel(source)
    known = {u.name: tuple(u.shape) for u in model.units}
    for unit in allocation.data.units:
        if known.get(unit.name) != tuple(unit.shape):
            raise BitallocError(
                f"{unit.name} {tuple(unit.shape)} is not a unit of the checkpoint in {source}; "
                "the allocation was made for another model"
            )
    return model


def _stored(value: torch.Tensor) -> torch.Tensor:
    """An unquantized tensor as the export keeps it."""
    return value.to(EXPORT_DTYPE) if value.is_floating_point() else value


def _compressed_in_order(
    model: StreamedModel, layers, formats, workers: int, ray_address: str | None
) -> Iterator[tuple[bytes, list[str], int]]:
    """Each layer's shard (:func:`layer_shard`), in order: made here, or on ``workers`` Ray
    workers with at most two layers each in flight."""
    if not workers:
        for index, units in layers:
            yield layer_shard(model.checkpoint, f"model.layers.{index}.", units, formats)
        return
    from bitalloc.jobs import ray_session

    names = {name: fmt.name for name, fmt in formats.items()}
    with ray_session(ray_address, workers) as ray:
        remote = ray.remote(num_cpus=1)(_remote_layer_shard)
        path = str(model.checkpoint.path)
        pending: deque = deque()
        for index, units in layers:
            mine = {u.name: names[u.name] for u in units}
            pending.append(remote.remote(path, f"model.layers.{index}.", units, mine))
            if len(pending) >= 2 * workers:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())


def _remote_layer_shard(path: str, prefix: str, units, names: dict[str, str]):
    """A Ray task: :func:`layer_shard` with the checkpoint opened here."""
    from bitalloc.formats import parse_format
    from bitalloc.streaming.sources import open_checkpoint

    torch.set_num_threads(1)
    formats = {name: parse_format(f) for name, f in names.items()}
    return layer_shard(open_checkpoint(path), prefix, units, formats)


def layer_shard(checkpoint, prefix: str, units, formats) -> tuple[bytes, list[str], int]:
    """One layer's shard as bytes (safetensors: they cross processes as they are written),
    its tensors' names and its count of shared-scale groups (see :func:`layer_tensors`)."""
    from safetensors.torch import save

    tensors, groups = layer_tensors(checkpoint, prefix, units, formats)
    return save(tensors, metadata={"format": "pt"}), list(tensors), groups


def layer_tensors(checkpoint, prefix: str, units, formats) -> tuple[dict[str, torch.Tensor], int]:
    """One layer's tensors as the export stores them (compressed units, the rest in
    :data:`EXPORT_DTYPE`), and the count of its fused groups whose nvfp4 scales were made
    one."""
    names = checkpoint.names(prefix)
    weights = {f"{u.name}.weight": u for u in units}
    values = checkpoint.read(names, torch.float32)
    shared, groups = _shared_global_scales(lambda u: values[f"{u}.weight"], units, formats)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        unit = weights.get(name)
        if unit is None:
            tensors[name] = _stored(value)
            continue
        fmt = formats[unit.name]
        if isinstance(fmt, CTFormat):
            compressed = fmt.compress(value, global_scale=shared.get(unit.name))
            tensors.update({f"{unit.name}.{k}": t.contiguous() for k, t in compressed.items()})
        else:
            tensors[name] = value.to(EXPORT_DTYPE)
    return tensors, groups


def _write_shard(
    directory: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]
) -> int:
    from safetensors.torch import save_file

    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    return (directory / name).stat().st_size
