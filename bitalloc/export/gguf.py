"""An allocation as a GGUF file that llama.cpp, Ollama and transformers load.

The source is a GGUF file (the default model, or any user GGUF of a supported architecture):
its metadata (architecture, hyper-parameters, tokenizer, chat template) is copied key by key,
and its tensors are written in the same order with new types:

- an allocated unit gets the ``gguf:`` type the allocation chose, quantized by llama.cpp's own
  code (:class:`~bitalloc.formats.gguf.GGUFFormat`) with the allocation's importance as imatrix,
  from the weights the allocation measured (scale folding repeated, see
  :func:`~bitalloc.export.base.weights_to_export`);
- every other tensor gets llama.cpp's convention (:func:`convention_type`): 1-D tensors (norms,
  biases) F32, the output head (or the token embedding when it doubles as the head) Q6_K, or
  Q8_0 when its rows are not whole 256-blocks, as ``llama-quantize`` does; where the source
  already holds exactly those bytes they are copied, never quantized twice.

Llama-architecture GGUF files store q and k with their rows permuted for llama.cpp's rotary
layout (transformers undoes it on load); :func:`llama_permute` redoes it before quantizing. A
row permutation commutes with llama.cpp's quantizers, which quantize each row on its own.

The file is written beside ``out`` under a temporary name, read back (every tensor's type,
shape and bytes must equal the plan) and only then renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import libgguf
import numpy as np
import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.export.base import (
    ExportedTensor,
    ExportReport,
    check_export_path,
    importance_of,
    progress_iter,
    weights_to_export,
)
from bitalloc.fileio import _fsync_directory
from bitalloc.formats import GGUFFormat, parse_format

#: GGUF architectures whose tensors this exporter knows how to lay out, and whether their q/k
#: rows are permuted for llama.cpp's rotary embedding.
SUPPORTED_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
#: Keys the writer sets itself (or that describe the old file) and are not copied.
_OWN_KEYS = ("GGUF.", "general.alignment", "general.file_type")
#: Metadata key recording what made the file.
ALLOCATION_KEY = "bitalloc.allocation.avg_bits"


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file to write: name, llama.cpp type, element shape (out, in) or (n,),
    the unit it stores (None outside the allocation), and source bytes to copy (None: quantize
    ``value``)."""

    name: str
    type: str
    shape: tuple[int, ...]
    unit: str | None
    value: torch.Tensor | None
    copy: bytes | None = None


def convention_type(name: str, shape: tuple[int, ...], has_output: bool) -> str:
    """The llama.cpp type a tensor outside the allocation gets: F32 for 1-D tensors; for the
    output head (or a token embedding that doubles as the head, ``has_output`` false) Q6_K, or
    Q8_0 when the row width is not a multiple of 256 (``llama-quantize``'s rule); Q8_0 for other
    matrices whose rows are whole 32-blocks, else F16."""
    if len(shape) == 1:
        return "F32"
    width = shape[-1]
    is_head = name == "output.weight" or (name == "token_embd.weight" and not has_output)
    if is_head and width % 256 == 0:
        return "Q6_K"
    return "Q8_0" if width % 32 == 0 else "F16"


def llama_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered from Hugging Face's rotary layout (halves) to
    llama.cpp's (interleaved pairs), per head."""
    out, width = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, width).transpose(1, 2).reshape(out, width)


def export_gguf(
    allocation,
    model: nn.Module,
    source: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    tokenizer: object | None = None,
    force: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write ``allocation`` applied to ``model`` as a GGUF file at ``out``, taking metadata and
    tokenizer from the GGUF file ``source`` the model was loaded from, or, with ``source``
    None, converting them from a Hugging Face Llama ``model`` and its ``tokenizer``
    (:func:`~bitalloc.export.gguf_convert.convert_llama`).

    Raises :class:`BitallocError`, with nothing written, when ``out`` exists and ``force`` is
    false, when a unit's format is not a ``gguf:`` type, when the allocation or the model does
    not match the source, when the source's architecture is not supported, or when the written
    file does not read back as planned.
    """
    out = check_export_path(out, force=force, directory=False)
    formats = gguf_formats(allocation)
    reader = _open(source, model, tokenizer)
    arch = gguf_field(reader, "general.architecture")
    folded, importance = weights_to_export(allocation, model)
    plan = _plan(reader, arch, folded, allocation, formats)
    warnings = (*requantize_warnings(reader, plan), *getattr(reader, "notes", ()))
    tmp = _write(reader, plan, out, allocation, importance, formats, progress)
    try:
        tensors = check_written(tmp, plan, formats)
        os.replace(tmp, out)
        _fsync_directory(out.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportReport(out, "gguf", tensors, out.stat().st_size, warnings)


def gguf_source(model: str | os.PathLike[str]) -> Path | None:
    """The GGUF file a model path names (checked: readable, supported architecture), or None
    for a Hugging Face directory, whose metadata and tokenizer the export converts."""
    path = Path(str(model))
    if path.is_dir():
        return None
    if not path.is_file():
        raise BitallocError(
            f"the model {model} is neither a .gguf file nor a Hugging Face directory; pass "
            "--model with the model the allocation was made for"
        )
    arch = gguf_field(read_gguf(path), "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BitallocError(
            f"cannot export GGUF from {path}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return path


def _open(source, model: nn.Module, tokenizer: object | None):
    """The source's reader: the GGUF file's, or a conversion of the Hugging Face model."""
    if source is None:
        from bitalloc.export.gguf_convert import convert_llama

        return convert_llama(model, tokenizer)
    source = Path(source)
    reader = read_gguf(source)
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BitallocError(
            f"cannot export GGUF from {source}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return reader


def gguf_overhead(
    source: Path | None, model: nn.Module, units, tokenizer: object | None = None
) -> int:
    """Bytes a GGUF export of ``model`` from ``source`` spends on everything but the units
    (upper bound): the source's header, metadata and tensor infos, a block of alignment
    padding per tensor, and every other tensor in its :func:`convention_type` (or its source
    type when the model has no parameter for it); ``source`` None: the conversion of the
    Hugging Face ``model`` with ``tokenizer``."""
    reader = _open(source, model, tokenizer)
    arch = gguf_field(reader, "general.architecture")
    to_param = gguf_param_names(model, arch, int(gguf_field(reader, f"{arch}.block_count")))
    unit_params = {f"{u.name}.weight" for u in units}
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    alignment = reader.fields.get("general.alignment")
    align = int(alignment.contents()) if alignment is not None else gguf.GGUF_DEFAULT_ALIGNMENT
    total = int(reader.data_offset) + align * len(reader.tensors)
    for tensor in reader.tensors:
        param = to_param.get(tensor.name)
        if param in unit_params:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if param is None:
            total += int(tensor.n_bytes)
            continue
        kind = convention_type(tensor.name, shape, has_output)
        total += planned_bytes(PlannedTensor(tensor.name, kind, shape, None, None), {})
    return total


def source_tensor_types(source: Path, model: nn.Module, units) -> dict[str, str]:
    """Unit -> the quantized llama.cpp type ``source`` stores it in (float types left out)."""
    reader = read_gguf(source)
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        return {}
    to_param = gguf_param_names(model, arch, int(gguf_field(reader, f"{arch}.block_count")))
    unit_of = {f"{u.name}.weight": u.name for u in units}
    found = {}
    for tensor in reader.tensors:
        unit = unit_of.get(to_param.get(tensor.name, ""))
        kind = tensor.tensor_type.name
        if unit is not None and kind not in ("F32", "F16", "BF16"):
            found[unit] = kind
    return found


def read_gguf(source: Path) -> gguf.GGUFReader:
    """The reader of the GGUF file ``source``; a clear error when it is missing or unreadable."""
    if not source.is_file():
        raise BitallocError(f"GGUF source {source} does not exist; pass the model's .gguf file")
    try:
        return gguf.GGUFReader(source)
    except Exception as exc:  # noqa: BLE001 - the reader raises many types on a bad file
        raise BitallocError(
            f"cannot read GGUF source {source} ({type(exc).__name__}: {exc}); pass a valid "
            "GGUF file"
        ) from None


def gguf_field(reader: gguf.GGUFReader, key: str):
    """The value of metadata ``key``; a clear error when the file has none."""
    field = reader.fields.get(key)
    if field is None:
        raise BitallocError(f"GGUF source has no {key!r} key; it is not a model file")
    return field.contents()


def gguf_formats(allocation) -> dict[str, GGUFFormat]:
    """Unit -> its ``gguf:`` format; a clear error for a unit whose format is not one."""
    formats = {}
    for unit, name in allocation.formats.items():
        fmt = parse_format(name)
        if not isinstance(fmt, GGUFFormat):
            raise BitallocError(
                f"unit {unit!r} has format {name!r}, which is not a llama.cpp type; a GGUF file "
                "holds gguf: types only: allocate with --target gguf (or --formats gguf:...)"
            )
        formats[unit] = fmt
    return formats


def gguf_param_names(model: nn.Module, arch: str, n_blocks: int) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, through the gguf package's map."""
    arch_id = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tensor_map = gguf.get_tensor_name_map(arch_id, n_blocks)
    names = {}
    for param in dict(model.named_parameters()):
        mapped = tensor_map.get_name(param, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            names.setdefault(mapped, param)
    return names


def _plan(reader, arch, model, allocation, formats) -> list[PlannedTensor]:
    n_blocks = int(gguf_field(reader, f"{arch}.block_count"))
    to_param = gguf_param_names(model, arch, n_blocks)
    params = dict(model.named_parameters())
    unit_of = {f"{u.name}.weight": u.name for u in allocation.data.units}
    heads = {
        "attn_q": int(gguf_field(reader, f"{arch}.attention.head_count")),
        "attn_k": int(gguf_field(reader, f"{arch}.attention.head_count_kv")),
    }
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    plan, seen = [], set()
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        param = to_param.get(tensor.name)
        if param is None:  # a tensor the model has no parameter for (rope factors, ...)
            plan.append(_copied(tensor, shape))
            continue
        value = params[param].detach().float()
        if tuple(value.shape) != shape:
            raise BitallocError(
                f"GGUF tensor {tensor.name} is {shape} but the model's {param} is "
                f"{tuple(value.shape)}: the model was not loaded from this GGUF file"
            )
        unit = unit_of.get(param)
        kind = tensor.name.split(".")[-2]
        if SUPPORTED_ARCHITECTURES[arch] and kind in heads:
            value = llama_permute(value, heads[kind])
        if unit is not None:
            seen.add(unit)
            plan.append(PlannedTensor(tensor.name, formats[unit].type, shape, unit, value))
            continue
        wanted = convention_type(tensor.name, shape, has_output)
        plan.append(_kept(tensor, shape, wanted, value))
    missing = [u for u in formats if u not in seen]
    if missing:
        raise BitallocError(
            f"{len(missing)} units of the allocation have no tensor in the GGUF source (first: "
            f"{missing[0]!r}); export an allocation made for this model"
        )
    return plan


def _copied(tensor, shape: tuple[int, ...]) -> PlannedTensor:
    data = bytes(np.asarray(tensor.data).view(np.uint8).tobytes())
    return PlannedTensor(tensor.name, tensor.tensor_type.name, shape, None, None, data)


def _kept(tensor, shape: tuple[int, ...], wanted: str, value: torch.Tensor) -> PlannedTensor:
    """A tensor outside the allocation in type ``wanted``: the source's bytes when they are
    already of that type and store exactly ``value``, else ``value`` quantized."""
    if tensor.tensor_type.name == wanted:
        data = np.asarray(tensor.data).view(np.uint8).tobytes()
        stored = _dequantize(data, wanted, shape)
        if torch.equal(stored, value.reshape(stored.shape)):
            return PlannedTensor(tensor.name, wanted, shape, None, None, data)
    return PlannedTensor(tensor.name, wanted, shape, None, value)


def _dequantize(data: bytes, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if type_name == "F32":
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy()).reshape(shape)
    if len(shape) == 1:
        shape = (1, shape[0])
    return GGUFFormat(type_name).dequantize_bytes(data, shape)


def encode_tensor(
    planned: PlannedTensor, importance
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A planned tensor's bytes (its copy, or its value quantized with the unit's importance as
    imatrix) shaped as the writer takes them, and its llama.cpp type."""
    qtype = gguf.GGMLQuantizationType[planned.type]
    if planned.copy is not None:
        raw = np.frombuffer(planned.copy, dtype=np.uint8)
    elif planned.type == "F32":
        return planned.value.numpy().astype("<f4").reshape(planned.shape), qtype
    else:
        fmt = GGUFFormat(planned.type)
        weight = planned.value.reshape(-1, planned.shape[-1])
        imatrix = importance_of(importance, planned.unit) if planned.unit else None
        raw = np.frombuffer(fmt.quantize_bytes(weight, imatrix), dtype=np.uint8)
    if len(planned.shape) == 1:
        return raw, qtype
    return raw.reshape(int(np.prod(planned.shape[:-1])), -1), qtype


def new_writer(path: str, reader, allocation, formats: dict[str, GGUFFormat]) -> gguf.GGUFWriter:
    """A GGUF writer on ``path`` holding the metadata of ``reader`` (a GGUF file's or a
    :class:`~bitalloc.export.gguf_convert.ConvertedSource`), its alignment, the file type of
    ``formats`` and the allocation's average bits; no tensor yet."""
    writer = gguf.GGUFWriter(path, gguf_field(reader, "general.architecture"), use_temp_file=False)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.add_custom_alignment(int(alignment.contents()))
    for field in reader.fields.values():
        if field.name.startswith(_OWN_KEYS) or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(_file_type(formats))
    writer.add_float32(ALLOCATION_KEY, float(allocation.avg_bits))
    return writer


def _write(reader, plan, out: Path, allocation, importance, formats, progress: bool) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = new_writer(tmp, reader, allocation, formats)
        for planned in progress_iter(plan, "writing GGUF", progress):
            data, qtype = encode_tensor(planned, importance)
            writer.add_tensor(planned.name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BitallocError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise
    return tmp


def _file_type(formats: dict[str, GGUFFormat]) -> int:
    """llama.cpp's ``general.file_type`` for the type holding most units (it is informative:
    llama.cpp reads each tensor's own type)."""
    counts: dict[str, int] = {}
    for fmt in formats.values():
        counts[fmt.type] = counts.get(fmt.type, 0) + 1
    top = max(sorted(counts), key=counts.get) if counts else "F16"
    name = "ALL_F32" if top == "F32" else f"MOSTLY_{top}"
    return int(getattr(gguf.LlamaFileType, name, gguf.LlamaFileType.GUESSED))


def check_written(path: str, plan, formats) -> tuple[ExportedTensor, ...]:
    """Read the written file back; every tensor's type, shape and bytes must be the plan's."""
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    if len(found) != len(plan):
        raise BitallocError(f"the written GGUF holds {len(found)} tensors, planned {len(plan)}")
    report = []
    for planned in plan:
        tensor = found.get(planned.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist())) if tensor else None
        expected = planned_bytes(planned, formats)
        if (
            tensor is None
            or tensor.tensor_type.name != planned.type
            or shape != planned.shape
            or int(tensor.n_bytes) != expected
        ):
            got = (
                "missing"
                if tensor is None
                else (f"{tensor.tensor_type.name} {shape}, {int(tensor.n_bytes)} bytes")
            )
            raise BitallocError(
                f"export check failed: tensor {planned.name} should be {planned.type} "
                f"{planned.shape}, {expected} bytes; the written file has {got}"
            )
        report.append(ExportedTensor(planned.name, planned.type, expected, planned.unit))
    return tuple(report)


def planned_bytes(planned: PlannedTensor, formats) -> int:
    """The bytes a planned tensor takes in the file."""
    if planned.unit is not None:
        return formats[planned.unit].storage_bits(planned.shape) // 8
    qtype = libgguf.GGMLQuantizationType[planned.type]
    rows = int(np.prod(planned.shape[:-1])) if len(planned.shape) > 1 else 1
    return rows * libgguf.row_size(qtype, planned.shape[-1])


def requantize_warnings(reader, plan) -> list[str]:
    """A warning when the source's units were already quantized: their types in the
    allocation quantize a quantized model's weights again, which compounds the errors."""
    source = {t.name: t.tensor_type.name for t in reader.tensors}
    kinds = sorted({source[p.name] for p in plan if p.unit is not None} - {"F32", "F16", "BF16"})
    if not kinds:
        return []
    return [
        f"the source stores the allocated weights as {', '.join(kinds)}; they were quantized "
        "again from those values (quality is bounded by the source's quantization)"
    ]
