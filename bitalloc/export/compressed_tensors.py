"""An allocation as a compressed-tensors checkpoint: a Hugging Face directory that vLLM and
transformers load.

Every unit takes a ``ct:`` format (:class:`~bitalloc.formats.ct.CTFormat`) or ``fp16``. The
directory holds:

- ``model.safetensors``: each ``ct:`` unit as the tensors compressed-tensors' own compressor for
  its scheme writes (``<module>.weight_packed``, ``.weight_scale``, ... : see
  :meth:`CTFormat.layout`), quantized from the weights the allocation measured (scale folding
  repeated, see :func:`~bitalloc.export.base.weights_to_export`); every other tensor of the model
  (``fp16`` units, embeddings, norms, biases, the output head) in bfloat16, the dtype of the int
  schemes' scales (:data:`~bitalloc.formats.ct.SCALE_DTYPE`), and a tied output head once, under
  the embedding's name;
- ``config.json``: the model's config with ``dtype`` bfloat16 and a ``quantization_config``
  written by compressed-tensors' ``ModelCompressor``: one config group per scheme, targeting
  its modules by exact name, each with its compression format (the top-level ``format`` is that
  format, or ``mixed-precision``), and an ``ignore`` list naming every other Linear layer
  (``fp16`` units, ``lm_head``), as the package lists unquantized layers;
- the tokenizer's files and, when the model has one, ``generation_config.json``.

Fused layers. vLLM runs q/k/v and gate/up of a block as one matrix: it needs one scheme for all
of a fused group (the allocation's ``--tie qkv,gateup`` gives that; the export warns otherwise,
since vLLM refuses such a checkpoint, while transformers loads it), and for ``ct:nvfp4`` it
applies one global scale, the largest of the group's. So the ``ct:nvfp4`` units of a fused group
share one global scale here, the least of their own (as llm-compressor fuses them); their stored
weights then differ slightly from :meth:`Allocation.apply`'s per-tensor ones, and the report
says so.

The ``ct:`` formats ignore importance (min-max scales), so the allocation's importance does not
change what is written. The directory is filled under a temporary name, the safetensors file is
read back (every unit's tensors must have the names, dtypes, shapes and bytes of its format:
:meth:`~bitalloc.formats.base.Format.storage_bits`), and only then renamed into place.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.export.base import (
    ExportedTensor,
    ExportReport,
    atomic_directory,
    check_export_path,
    progress_iter,
    weights_to_export,
)
from bitalloc.formats import Format, parse_format
from bitalloc.formats.ct import SCALE_DTYPE, CTFormat
from bitalloc.streaming.checkpoint import SAFETENSORS_DTYPES

#: The weights file of the export.
WEIGHTS_FILE = "model.safetensors"
#: Dtype of every tensor the export keeps unquantized.
EXPORT_DTYPE = SCALE_DTYPE


def export_compressed_tensors(
    allocation,
    model: nn.Module,
    tokenizer,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write ``allocation`` applied to ``model`` as a compressed-tensors checkpoint directory at
    ``out``, with ``tokenizer``'s files, and return what was written.

    Raises :class:`BitallocError`, with nothing written, when ``out`` exists and ``force`` is
    false, when a unit's format is neither a ``ct:`` format nor ``fp16``, when no unit is
    ``ct:``, when the tokenizer cannot save its files, when the allocation was made for another
    model, or when the written file does not read back as the formats say.
    """
    formats = _export_formats(allocation)
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise BitallocError(
            f"the tokenizer ({type(tokenizer).__name__}) has no save_pretrained; pass the "
            "model's Hugging Face tokenizer, whose files the checkpoint needs"
        )
    path = check_export_path(out, force=force, directory=True)
    folded, _ = weights_to_export(allocation, model)  # ct formats take no importance
    units = allocation.data.units
    warnings = _mixed_group_warnings(units, formats)
    shared, groups = _shared_global_scales(lambda unit: _weight(folded, unit), units, formats)
    warnings += _shared_scale_warnings(groups)
    tensors = _tensors(folded, units, formats, shared, progress)
    config = _quantization_config(folded, units, formats)
    try:
        with atomic_directory(path) as tmp:
            _write_weights(tensors, tmp / WEIGHTS_FILE)
            del tensors
            _write_config(folded, tmp, config)
            tokenizer.save_pretrained(tmp)
            if getattr(folded, "generation_config", None) is not None:
                folded.generation_config.save_pretrained(tmp)
            report = _check_written(tmp / WEIGHTS_FILE, units, formats)
            file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
    except OSError as exc:
        raise BitallocError(f"cannot write {path}: {exc.strerror or exc}") from None
    return ExportReport(path, "compressed-tensors", report, file_bytes, tuple(warnings))


def _export_formats(allocation) -> dict[str, Format]:
    """Unit -> format, refusing a format that is neither ``ct:`` nor ``fp16``."""
    formats = {}
    for unit, name in allocation.formats.items():
        fmt = parse_format(name)
        if not isinstance(fmt, CTFormat) and fmt.family != "float":
            raise BitallocError(
                f"unit {unit!r} has format {name!r}, which is not a compressed-tensors scheme; "
                "a compressed-tensors checkpoint holds ct: formats and fp16 only: allocate with "
                "--target ct (or --formats ct:...)"
            )
        formats[unit] = fmt
    if not any(isinstance(f, CTFormat) for f in formats.values()):
        raise BitallocError(
            "every unit of the allocation is fp16, so there is nothing to compress; allocate "
            "with ct: formats (--target ct), or save the model with save_pretrained"
        )
    return formats


def _fused_groups(units) -> dict[str, list]:
    """Fusion group -> its units, for the groups of more than one unit (q/k/v, gate/up)."""
    groups: dict[str, list] = defaultdict(list)
    for u in units:
        groups[u.group].append(u)
    return {g: members for g, members in groups.items() if len(members) > 1}


def _mixed_group_warnings(units, formats) -> list[str]:
    mixed = [
        (group, members)
        for group, members in _fused_groups(units).items()
        if len({formats[u.name] for u in members}) > 1
    ]
    if not mixed:
        return []
    group, members = mixed[0]
    kinds = ", ".join(dict.fromkeys(formats[u.name].name for u in members))
    return [
        f"{len(mixed)} fused groups mix formats (first: {group}: {kinds}); vLLM fuses them into "
        "one layer and needs one scheme for it, so it will not load this checkpoint "
        "(transformers will): allocate with --tie qkv,gateup"
    ]


def _shared_global_scales(
    weight_of: Callable[[str], torch.Tensor], units, formats
) -> tuple[dict[str, torch.Tensor], int]:
    """Unit -> the global scale it shares with the other ``ct:nvfp4`` units of its fused group
    (the least of theirs), and how many groups had differing scales; ``weight_of`` gives a
    unit's weight by name."""
    shared: dict[str, torch.Tensor] = {}
    groups = 0
    for members in _fused_groups(units).values():
        if not all(formats[u.name] == CTFormat("nvfp4") for u in members):
            continue
        scales = [formats[u.name].global_scale(weight_of(u.name)) for u in members]
        least = torch.stack([s.reshape(()) for s in scales]).min().reshape(1)
        if any(not torch.equal(s, least) for s in scales):
            groups += 1
        shared.update({u.name: least.clone() for u in members})  # safetensors: no aliases
    return shared, groups


def _shared_scale_warnings(groups: int) -> list[str]:
    """The warning for ``groups`` fused groups whose nvfp4 scales were made one (none for 0)."""
    if not groups:
        return []
    return [
        f"{groups} fused groups of ct:nvfp4 units share one global scale each, as vLLM "
        "requires; their stored weights differ slightly from the allocation's per-tensor "
        "quantization"
    ]


def _weight(model: nn.Module, unit: str) -> torch.Tensor:
    return model.get_submodule(unit).weight.detach()


def _tensors(model: nn.Module, units, formats, shared, progress: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name: compressed units, every other tensor in
    :data:`EXPORT_DTYPE`, tied tensors once."""
    by_weight = {f"{u.name}.weight": u for u in units}
    tensors: dict[str, torch.Tensor] = {}
    for u in progress_iter(list(units), "compressing", progress):
        fmt = formats[u.name]
        weight = _weight(model, u.name)
        if isinstance(fmt, CTFormat):
            compressed = fmt.compress(weight, global_scale=shared.get(u.name))
            tensors.update({f"{u.name}.{k}": t.cpu() for k, t in compressed.items()})
        else:
            tensors[f"{u.name}.weight"] = weight.to(device="cpu", dtype=EXPORT_DTYPE)
    seen: set[tuple] = set()
    for name, value in model.state_dict().items():
        if name in by_weight:
            continue
        # A tied output head is the embedding's tensor under a second name: stored once, as
        # save_pretrained does (the config's tie_word_embeddings ties it again on load).
        key = (value.device, value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
        if value.numel() and key in seen:
            continue
        seen.add(key)
        value = value.detach()
        if value.is_floating_point():
            value = value.to(EXPORT_DTYPE)
        tensors[name] = value.to("cpu").contiguous()
    return tensors


def _quantization_config(model: nn.Module, units, formats):
    """compressed-tensors' ``QuantizationConfig``: a config group per scheme (targets: its
    modules' names, in network order), the format, and every other Linear layer ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    targets: dict[CTFormat, list[str]] = {}
    for u in units:
        fmt = formats[u.name]
        if isinstance(fmt, CTFormat):
            targets.setdefault(fmt, []).append(u.name)
    quantized = {name for names in targets.values() for name in names}
    ignore = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in quantized
    ]
    kinds = {fmt.compression_format for fmt in targets}
    return QuantizationConfig(
        config_groups={
            f"group_{i}": fmt.quantization_scheme(names)
            for i, (fmt, names) in enumerate(targets.items())
        },
        format=kinds.pop() if len(kinds) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_config(model: nn.Module, directory: Path, quantization_config) -> None:
    """``config.json``: the model's config in :data:`EXPORT_DTYPE`, and the quantization config
    as compressed-tensors writes it (version, method, groups, format, ignore)."""
    from compressed_tensors.compressors import ModelCompressor

    config = copy.deepcopy(model.config)
    # A config loaded from a quantized checkpoint carries its old quantization config.
    if "quantization_config" in vars(config):
        delattr(config, "quantization_config")
    config.dtype = EXPORT_DTYPE
    config.save_pretrained(directory)
    ModelCompressor(quantization_config=quantization_config).update_config(str(directory))


def _check_written(path: Path, units, formats) -> tuple[ExportedTensor, ...]:
    """Read the file's header back: each unit's tensors must be exactly its format's (names,
    dtypes, shapes) and their bytes its :meth:`storage_bits`; every tensor is reported."""
    from safetensors import safe_open

    stored: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            piece = handle.get_slice(name)
            stored[name] = (SAFETENSORS_DTYPES.get(piece.get_dtype()), tuple(piece.get_shape()))
    report = []
    owned: set[str] = set()
    for u in units:
        fmt = formats[u.name]
        if isinstance(fmt, CTFormat):
            expected = fmt.layout(u.shape)
        else:
            expected = {"weight": (EXPORT_DTYPE, tuple(u.shape))}
        prefix = f"{u.name}."
        local = {
            n[len(prefix) :]: v
            for n, v in stored.items()
            if n.startswith(prefix) and n[len(prefix) :] != "bias"
        }
        want = {k: (d, tuple(s)) for k, (d, s) in expected.items()}
        nbytes = {k: _nbytes(d, s) for k, (d, s) in local.items()}
        if local != want or sum(nbytes.values()) != fmt.storage_bits(u.shape) // 8:
            raise BitallocError(
                f"export check failed: unit {u.name} ({fmt.name}) should be stored as "
                f"{_describe(want)} ({fmt.storage_bits(u.shape) // 8} bytes); the written file "
                f"has {_describe(local)} ({sum(nbytes.values())} bytes)"
            )
        for k, (dtype, _shape) in local.items():
            owned.add(prefix + k)
            report.append(ExportedTensor(prefix + k, _dtype_name(dtype), nbytes[k], u.name))
    for name, (dtype, shape) in stored.items():
        if name not in owned:
            report.append(ExportedTensor(name, _dtype_name(dtype), _nbytes(dtype, shape), None))
    return tuple(report)


def _nbytes(dtype: torch.dtype | None, shape: tuple[int, ...]) -> int:
    if dtype is None:
        raise BitallocError(
            "export check failed: the written file holds a tensor of a dtype "
            "this export never writes"
        )
    count = 1
    for d in shape:
        count *= d
    return count * torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(tensors: dict[str, tuple[torch.dtype | None, tuple[int, ...]]]) -> str:
    if not tensors:
        return "no tensors"
    return ", ".join(f"{k} {_dtype_name(d)} {list(s)}" for k, (d, s) in sorted(tensors.items()))
