"""Targets: the engine an allocation is made for, and what that fixes besides the formats.

``bitalloc`` (the default) allocates over bitalloc's own formats and runs them in its packed
kernels. ``gguf`` allocates over llama.cpp's tensor types for a GGUF file
(:mod:`bitalloc.export.gguf`); ``ct`` over compressed-tensors schemes for a vLLM / transformers
checkpoint (:mod:`bitalloc.export.compressed_tensors`). A target fixes:

- the default palette (:func:`target_palette`) and which families a palette may name
  (:func:`check_target_palette`): a GGUF file holds llama.cpp types only;
- the ties the engine needs (:func:`target_ties`): vLLM fuses q/k/v and gate/up into one
  matrix each, with one scheme, so ``ct`` ties them;
- how the tensors outside the allocation are stored (:func:`outside_tensors`): llama.cpp's
  convention for a GGUF file (F32 norms; the output head Q6_K, or Q8_0 when its rows are not
  whole 256-blocks), bfloat16 in a compressed-tensors checkpoint; their bytes are reported;
- what a file-size budget leaves for the units (:func:`unit_byte_budget`): the file's bytes
  minus everything else it holds (those tensors, the metadata, alignment padding), so that the
  exported file is never larger than asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import libgguf
from torch import nn

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import parse_format
from bitalloc.models import Unit, excluded_parameters

TARGETS = ("bitalloc", "gguf", "ct")
#: The default palette of each engine target. gguf: the K-quant ladder, the 256-block IQ types
#: that llama.cpp's presets use, and the 32-block types that fit any width that is a multiple
#: of 32 (on SmolLM2 only down_proj takes 256-block types); F16 keeps a unit unquantized.
GGUF_PALETTE = (
    "gguf:Q2_K",
    "gguf:Q3_K",
    "gguf:IQ3_S",
    "gguf:IQ4_XS",
    "gguf:Q4_K",
    "gguf:Q5_K",
    "gguf:Q6_K",
    "gguf:MXFP4",
    "gguf:Q4_0",
    "gguf:Q4_1",
    "gguf:IQ4_NL",
    "gguf:Q5_0",
    "gguf:Q5_1",
    "gguf:Q8_0",
    "gguf:F16",
)
#: ct: weight-only schemes vLLM runs, and fp16 (the module left unquantized). The ``-asym``
#: int schemes are left to ``--formats``: transformers (5.24 with compressed-tensors 0.20) does
#: not load their zero points beside other schemes.
CT_PALETTE = (
    "ct:int4-g32",
    "ct:int4-g64",
    "ct:int4-g128",
    "ct:int8-g64",
    "ct:int8-g128",
    "ct:nvfp4",
    "ct:mxfp4",
    "ct:fp8-channel",
    "fp16",
)
_FAMILIES = {"gguf": ("gguf",), "ct": ("ct", "float")}
_EXPORT = {"gguf": "a GGUF file", "ct": "a compressed-tensors checkpoint"}
#: Fused projections vLLM loads as one matrix with one scheme.
CT_TIES = ("qkv", "gateup")
#: Upper bound of a safetensors header entry (name, dtype, shape, offsets as JSON).
_SAFETENSORS_ENTRY = 256
#: Tensors a compressed-tensors module stores at most (packed weight, scale, zero, shape).
_CT_TENSORS_PER_UNIT = 4
#: Metadata a GGUF export adds to the source's (its own key and a changed file type).
_GGUF_EXTRA = 128


@dataclass(frozen=True)
class StoredTensor:
    """A tensor outside the allocation as the target stores it: parameter name, type, bytes."""

    name: str
    type: str
    nbytes: int


def check_target(target: str) -> str:
    """``target`` if it is one of :data:`TARGETS`, else :class:`BitallocError`."""
    if target not in TARGETS:
        raise BitallocError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    return target


def target_palette(target: str) -> tuple[str, ...] | None:
    """The default palette of ``target`` (None: the registry's default, for ``bitalloc``)."""
    check_target(target)
    return {"gguf": GGUF_PALETTE, "ct": CT_PALETTE}.get(target)


def check_target_palette(target: str, formats: Iterable[str] | str) -> None:
    """Raise :class:`BitallocError` when ``formats`` names a format ``target``'s engine does
    not run (``bitalloc`` runs every family)."""
    check_target(target)
    families = _FAMILIES.get(target)
    if families is None:
        return
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    for name in formats:
        fmt = parse_format(name)
        if fmt.family not in families:
            example = {"gguf": "gguf:Q4_K", "ct": "ct:int4-g128"}[target]
            raise BitallocError(
                f"format {fmt.name} cannot be stored in {_EXPORT[target]}: --target {target} "
                f"takes formats of the {' and '.join(families)} famil"
                f"{'ies' if len(families) > 1 else 'y'} (e.g. {example})"
            )


def target_ties(target: str, ties: Sequence[str] | None) -> tuple[str, ...] | None:
    """The ties the plan enforces: the user's, plus q/k/v and gate/up for ``ct``."""
    if check_target(target) != "ct":
        return None if ties is None else tuple(ties)
    return tuple(dict.fromkeys([*(ties or ()), *CT_TIES]))


def outside_tensors(model: nn.Module, units: Sequence[Unit], target: str) -> list[StoredTensor]:
    """The parameters outside the allocation as ``target`` stores them (empty for
    ``bitalloc``, whose packed files keep them in the model's dtype)."""
    if check_target(target) == "bitalloc":
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embed is not None and head.weight is embed.weight
    found = []
    for name, numel in excluded_parameters(model, list(units)).items():
        shape = tuple(params[name].shape)
        if target == "ct":
            found.append(StoredTensor(name, "bf16", 2 * numel))
            continue
        from bitalloc.export.gguf import convention_type

        if head is not None and params[name] is head.weight:
            gguf_name = "output.weight"
        elif embed is not None and params[name] is embed.weight:
            gguf_name = "token_embd.weight" if not tied else "output.weight"
        else:
            gguf_name = name
        kind = convention_type(gguf_name, shape, has_output=True)
        found.append(StoredTensor(name, kind, _gguf_bytes(kind, shape)))
    return found


def _gguf_bytes(kind: str, shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * libgguf.row_size(libgguf.GGMLQuantizationType[kind], shape[-1])


def file_overhead(
    model: nn.Module,
    units: Sequence[Unit],
    target: str,
    source: str,
    tokenizer: object | None = None,
) -> int:
    """Bytes an exported file of ``target`` holds besides the units (upper bound): tensors
    outside the allocation, metadata and padding.

    A GGUF export copies its metadata and tokenizer from the GGUF file ``source`` the model was
    loaded from, or converts them from a Hugging Face Llama model and its ``tokenizer``.
    """
    if check_target(target) == "ct":
        outside = outside_tensors(model, units, target)
        entries = len(outside) + _CT_TENSORS_PER_UNIT * len(units)
        return 8 + _SAFETENSORS_ENTRY * entries + sum(t.nbytes for t in outside)
    if target != "gguf":
        raise BitallocError("a file-size budget needs --target gguf or --target ct")
    from bitalloc.export.gguf import gguf_overhead

    path = Path(str(source))
    gguf_file = path if path.is_file() and path.suffix.lower() == ".gguf" else None
    return gguf_overhead(gguf_file, model, units, tokenizer) + _GGUF_EXTRA


def unit_byte_budget(
    file_bytes: float, overhead: int, units: Sequence[Unit], palette: Sequence
) -> float:
    """The bytes a file budget leaves for the units; :class:`InfeasibleBudgetError` naming the
    reachable file sizes when the cheapest (or richest) allowed formats do not fit it."""
    low = high = 0
    for unit in units:
        costs = [f.storage_bits(unit.shape) // 8 for f in palette if f.allows(unit.shape)]
        low += min(costs)
        high += max(costs)
    left = file_bytes - overhead
    if left < low:
        mib = 2**20
        raise InfeasibleBudgetError(
            f"a file of {file_bytes / mib:.2f} MiB cannot hold this model with this palette: "
            f"the tensors outside the allocation and the metadata take {overhead / mib:.2f} "
            f"MiB and the units at least {low / mib:.2f} MiB; reachable file sizes are "
            f"{(overhead + low) / mib:.2f} to {(overhead + high) / mib:.2f} MiB",
            ((overhead + low), (overhead + high)),
        )
    return float(left)


def source_unit_types(source: str, model: nn.Module, units: Sequence[Unit]) -> dict[str, str]:
    """Unit -> its quantized type in the GGUF file the model was loaded from (empty when the
    source is not a GGUF file or stores the units unquantized)."""
    path = Path(str(source))
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return {}
    from bitalloc.export.gguf import source_tensor_types

    return source_tensor_types(path, model, units)
