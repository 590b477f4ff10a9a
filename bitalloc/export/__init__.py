"""Exports: an allocation and its model to a file an engine loads.

- :mod:`~bitalloc.export.base`: what every exporter shares (the weights to quantize, atomic
  writes, the read-back report).
- :mod:`~bitalloc.export.gguf`: a GGUF file for llama.cpp / Ollama (``gguf:`` formats).
- :mod:`~bitalloc.export.compressed_tensors`: a compressed-tensors checkpoint for vLLM /
  transformers (``ct:`` formats).

:func:`export_allocation` picks the exporter from the output's suffix (``.gguf``) or
``format``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.export.base import ExportedTensor, ExportReport

#: Export formats by name, and the suffix that selects each.
EXPORT_FORMATS = ("gguf", "compressed-tensors")


def export_format(out: str | os.PathLike[str], format: str | None = None) -> str:
    """``format`` when given (checked), else ``gguf`` for a ``.gguf`` path and
    ``compressed-tensors`` for any other (a directory)."""
    if format is not None:
        if format not in EXPORT_FORMATS:
            raise BitallocError(
                f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}"
            )
        return format
    return "gguf" if Path(out).suffix.lower() == ".gguf" else "compressed-tensors"


def export_allocation(
    allocation,
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    format: str | None = None,
    force: bool = False,
    progress: bool = True,
    stream: bool = False,
    workers: int = 0,
    ray_address: str | None = None,
) -> ExportReport:
    """Export ``allocation`` (an :class:`~bitalloc.allocation.Allocation` or its JSON file)
    applied to its model as a file an engine loads, and return what was written.

    ``model`` is the model the allocation was made for (default: the one it records: the
    ``.gguf`` file or Hugging Face directory). A GGUF export takes its metadata and tokenizer
    from a GGUF source, or converts them from a Hugging Face Llama model; a
    compressed-tensors export writes a Hugging Face directory.

    ``stream`` reads the model (a Hugging Face directory of safetensors shards, or a GGUF
    file) one tensor or layer at a time instead of loading it whole
    (:mod:`bitalloc.streaming`): for models larger than memory; the files written are the
    same. A streamed export quantizes on ``workers`` Ray workers when > 0 (a local Ray, or
    the cluster at ``ray_address``): GGUF tensor by tensor, compressed-tensors layer by layer.
    """
    from bitalloc.allocation import Allocation
    from bitalloc.models import load_model

    if not isinstance(allocation, Allocation):
        allocation = Allocation.load(allocation)
    kind = export_format(out, format)
    source = str(model) if model is not None else allocation.data.model
    if stream:
        return _export_streamed(
            allocation,
            source,
            out,
            kind,
            force=force,
            progress=progress,
            workers=workers,
            ray_address=ray_address,
        )
    if kind == "gguf":
        from bitalloc.export.gguf import export_gguf, gguf_source

        path = gguf_source(source)
        loaded = load_model(source)
        report = export_gguf(
            allocation,
            loaded.model,
            path,
            out,
            tokenizer=loaded.tokenizer,
            force=force,
            progress=progress,
        )
    else:
        from bitalloc.export.compressed_tensors import export_compressed_tensors

        loaded = load_model(source)
        report = export_compressed_tensors(
            allocation, loaded.model, loaded.tokenizer, out, force=force, progress=progress
        )
    return report


def _export_streamed(
    allocation,
    source: str,
    out,
    kind: str,
    *,
    force: bool,
    progress: bool,
    workers: int,
    ray_address: str | None,
):
    if not (Path(source).is_dir() or Path(source).is_file()):
        raise BitallocError(
            f"a streamed export reads a Hugging Face directory of safetensors shards or a .gguf "
            f"file; {source} is neither: pass --model"
        )
    if kind == "gguf":
        from bitalloc.streaming.export_gguf import export_gguf_streamed

        return export_gguf_streamed(
            allocation,
            source,
            out,
            force=force,
            progress=progress,
            workers=workers,
            ray_address=ray_address,
        )
    from bitalloc.streaming.export import export_compressed_tensors_streamed

    return export_compressed_tensors_streamed(
        allocation, source, out, force=force, workers=workers, ray_address=ray_address
    )


__all__ = ["EXPORT_FORMATS", "ExportReport", "ExportedTensor", "export_allocation", "export_format"]
