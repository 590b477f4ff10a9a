"""The result of a decision: unit -> format, with a summary, JSON in and out, and apply.

The JSON schema is strict (unknown fields and values of the wrong type are refused) and checked
for internal consistency whenever an allocation is built or loaded:

- the version is one this code reads (1 to :data:`ALLOCATION_VERSION`);
- every format exists, each unit's bits per weight match its format and shape;
- every number that can be recomputed is: ``total_bits``, ``avg_bits``, ``bytes``, ``numel``,
  ``excluded_numel``, ``predicted_loss`` (the units' losses plus the interaction terms), the
  solver's bound and gap and, on load, its objective (the predicted loss, unless the solve was
  joint with the KV cache), the measured loss increase (from the perplexities), the
  repair's final prediction, and the KV and joint totals;
- ``budget`` is what was asked, by resource (:class:`~bitalloc.records.Budget`), and what
  was achieved fits it: the weights' average bits within ``avg_bits``, their bytes within
  ``max_bytes``, the KV cache within ``kv_avg_bits``, and the joint record within
  ``memory_bytes``. (Version 1 files recorded one number, the bound on the weights' average
  bits the solve respected; they load with that number as ``avg_bits``.)

Numbers only a measurement gives (perplexities, wall times, repair rounds) are kept as written.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bitalloc.apply import fake_quantize_
from bitalloc.errors import BitallocError
from bitalloc.fileio import read_model, write_json_atomic
from bitalloc.folding_record import ScaleFolding, apply_recorded_
from bitalloc.formats import QuantFormat, parse_format
from bitalloc.importance import Importance, ImportanceRecord
from bitalloc.kv.record import JointBudget, KVAllocation
from bitalloc.models import Unit, get_linear
from bitalloc.records import (
    EDITED,
    Budget,
    ExcludedParameter,
    Measured,
    ProfileSummary,
    Repair,
    RepairRound,
    SolverSummary,
    Strict,
    same_sum,
)

if TYPE_CHECKING:
    from bitalloc.targets import StoredTensor

#: The version this code writes; it reads versions 1 to this one.
ALLOCATION_VERSION = 2
#: Largest dimension of a weight matrix a file may claim (larger ones are not weight shapes,
#: and their bit counts would overflow a float).
MAX_DIMENSION = 2**32

__all__ = [
    "ALLOCATION_VERSION",
    "Allocation",
    "AllocationData",
    "Budget",
    "ExcludedParameter",
    "Measured",
    "Repair",
    "RepairRound",
    "UnitChoice",
]


class UnitChoice(Strict):
    """One unit's decision."""

    name: str
    format: str
    bits_per_weight: float
    numel: int
    shape: tuple[int, int]
    layer: int
    role: str
    group: str
    predicted_loss: float | None = None

    @classmethod
    def of(cls, unit: Unit, fmt: QuantFormat, predicted_loss: float | None = None) -> UnitChoice:
        """The record of ``unit`` taking ``fmt`` (bits per weight derived from its shape)."""
        return cls(
            name=unit.name,
            format=fmt.name,
            bits_per_weight=fmt.bits_per_weight(unit.shape),
            numel=unit.numel,
            shape=unit.shape,
            layer=unit.layer,
            role=unit.role,
            group=unit.group,
            predicted_loss=predicted_loss,
        )


class AllocationData(Strict):
    """The serialised form of an :class:`Allocation`."""

    version: int = ALLOCATION_VERSION
    model: str
    #: What was asked, by resource.
    budget: Budget = Budget()
    avg_bits: float
    total_bits: int
    bytes: float
    numel: int
    predicted_loss: float | None = None
    units: list[UnitChoice]
    excluded: list[ExcludedParameter] = []
    excluded_numel: int = 0
    solver: SolverSummary | None = None
    profile: ProfileSummary | None = None
    measured: Measured | None = None
    repair: Repair | None = None
    #: Scale folding done before profiling; :meth:`Allocation.apply` repeats it.
    scale_folding: ScaleFolding | None = None
    #: The per-input-column importance that weighted every clipping search when the formats
    #: were profiled and measured (None: plain squared error, ``--clipping mse``, and files
    #: written before it was recorded); :meth:`Allocation.apply` quantizes with it, so the
    #: applied and packed weights are the ones that were measured.
    importance: ImportanceRecord | None = None
    #: The engine the allocation is for (``gguf``, ``ct``; None or ``bitalloc``: bitalloc's
    #: own kernels); see :mod:`bitalloc.targets`.
    target: str | None = None
    #: Unit -> the type the source file stored it in, when the model was loaded from a
    #: quantized GGUF file: exporting quantizes those already quantized weights again.
    source_types: dict[str, str] | None = None
    #: Per-layer KV-cache formats, when the KV cache was allocated too.
    kv: KVAllocation | None = None
    #: The joint weights + KV memory budget and its split, when one was given.
    joint: JointBudget | None = None
    #: The :class:`~bitalloc.config.AllocateConfig` (as JSON) the allocation was made with;
    #: ``bitalloc allocate --config`` reruns it.
    config: dict[str, Any] | None = None


class Allocation:
    """Unit -> format for one model, with its summary.

    ``avg_bits`` counts every stored bit of the allocated units (codes, scales, zeros) divided by
    their number of weights; parameters left out are listed in ``excluded``, not counted.
    """

    def __init__(self, data: AllocationData):
        _check_consistent(data)
        self.data = data
        # The run's importance with its Gram matrices, kept in memory only (see
        # :meth:`with_live_importance`); copies and loaded allocations do not have it.
        self._live_importance: Importance | None = None

    def with_live_importance(self, importance: Importance | None) -> Allocation:
        """This allocation, holding ``importance`` in memory when it carries Gram matrices, so
        that :meth:`apply` quantizes ``+gptq`` units exactly as the run measured them without
        gathering the matrices again (they are not saved)."""
        if importance is not None and importance.has_grams:
            self._live_importance = importance.restricted(u.name for u in self.data.units)
        return self

    @property
    def uses_grams(self) -> bool:
        """True when some unit's format quantizes with its inputs' Gram matrix (``+gptq``)."""
        return any(parse_format(u.format).uses_gram for u in self.data.units)

    @classmethod
    def from_choices(
        cls,
        *,
        model: str,
        budget: Budget | float | None,
        units: list[UnitChoice],
        excluded: dict[str, int] | None = None,
        solver: SolverSummary | None = None,
        profile: ProfileSummary | None = None,
        interaction_loss: float = 0.0,
        total_bits: int | None = None,
    ) -> Allocation:
        """Build an allocation, deriving the summary from the unit choices; the predicted loss
        is the sum of the units' terms plus ``interaction_loss`` (the pairwise terms).

        ``budget`` is the request (a number is an ``avg_bits`` request). ``total_bits`` is the
        units' stored bits as the solver counted them (its ``bits`` resource); without it they
        are counted from the formats (checked either way)."""
        if total_bits is None:
            total_bits = sum(parse_format(u.format).storage_bits(u.shape) for u in units)
        if budget is None:
            budget = Budget()
        elif not isinstance(budget, Budget):
            budget = Budget(avg_bits=float(budget))
        numel = sum(u.numel for u in units)
        losses = [u.predicted_loss for u in units]
        predicted = (
            None if any(x is None for x in losses) else float(sum(losses)) + interaction_loss
        )
        excluded = excluded or {}
        return cls(
            AllocationData(
                model=model,
                budget=budget,
                avg_bits=total_bits / numel,
                total_bits=total_bits,
                bytes=total_bits / 8,
                numel=numel,
                predicted_loss=predicted,
                units=units,
                excluded=[ExcludedParameter(name=k, numel=v) for k, v in excluded.items()],
                excluded_numel=sum(excluded.values()),
                solver=solver,
                profile=profile,
            )
        )

    # --- accessors -------------------------------------------------------------------------
    @property
    def avg_bits(self) -> float:
        """Achieved average bits per weight of the allocated units."""
        return self.data.avg_bits

    @property
    def formats(self) -> dict[str, str]:
        """Unit name -> format name."""
        return {u.name: u.format for u in self.data.units}

    @property
    def measured(self) -> Measured | None:
        """Measured quality, when the allocation was verified."""
        return self.data.measured

    def with_measured(self, measured: Measured) -> Allocation:
        """A copy carrying a measurement."""
        return Allocation(self.data.model_copy(update={"measured": measured}))

    def with_budget(self, budget: Budget) -> Allocation:
        """A copy recording ``budget`` as the request (checked against what it achieves)."""
        return Allocation(self.data.model_copy(update={"budget": budget}))

    def with_config(self, config: dict[str, Any]) -> Allocation:
        """A copy recording the configuration (JSON) it was made with."""
        return Allocation(self.data.model_copy(update={"config": config}))

    @property
    def target_bits(self) -> float:
        """The requested average bits per weight, or the achieved ones when none was asked
        (a bytes, KV or joint budget): where uniform baselines and plots place the budget."""
        requested = self.data.budget.avg_bits
        return self.data.avg_bits if requested is None else requested

    def with_repair(self, repair: Repair) -> Allocation:
        """A copy carrying the record of verify-and-repair."""
        return Allocation(self.data.model_copy(update={"repair": repair}))

    @property
    def kv_formats(self) -> dict[str, str]:
        """KV unit name -> KV format name; empty when the KV cache was not allocated."""
        return {} if self.data.kv is None else self.data.kv.formats

    @property
    def predicted_total_loss(self) -> float | None:
        """Predicted loss of the weights plus, when allocated, the KV cache."""
        return _predicted_total(self.data)

    def with_kv(self, kv: KVAllocation, joint: JointBudget | None = None) -> Allocation:
        """A copy carrying per-layer KV formats (and the joint budget that set them)."""
        return Allocation(self.data.model_copy(update={"kv": kv, "joint": joint}))

    def kv_cache(self, model: nn.Module):
        """A fresh :class:`~bitalloc.kv.QuantizedKVCache` applying this allocation's KV formats
        to ``model`` (pass it as the cache of a forward or of ``generate``)."""
        if self.data.kv is None:
            raise BitallocError(
                "this allocation has no KV formats; allocate with kv_avg_bits= or memory_bytes="
            )
        from bitalloc.kv.cache import build_kv_cache

        return build_kv_cache(model, self.kv_formats)

    def with_scale_folding(self, record: ScaleFolding) -> Allocation:
        """A copy recording that the model was scale-folded (by ``record``) before allocating."""
        return Allocation(self.data.model_copy(update={"scale_folding": record}))

    def with_target(
        self,
        target: str,
        outside: Sequence[StoredTensor] = (),
        source_types: Mapping[str, str] | None = None,
    ) -> Allocation:
        """A copy made for ``target``, with the parameters outside the allocation stored as
        ``outside`` says (type and bytes) and the source's quantized types of the units."""
        stored = {t.name: t for t in outside}
        excluded = [
            p.model_copy(update={"type": stored[p.name].type, "nbytes": stored[p.name].nbytes})
            if p.name in stored
            else p
            for p in self.data.excluded
        ]
        update = {"target": target, "excluded": excluded}
        if source_types:
            update["source_types"] = dict(source_types)
        return Allocation(self.data.model_copy(update=update))

    @property
    def outside_bytes(self) -> int | None:
        """Bytes of the parameters outside the allocation in the target's file (None when the
        target does not fix them)."""
        sizes = [p.nbytes for p in self.data.excluded]
        return None if not sizes or None in sizes else int(sum(sizes))

    def warnings(self) -> list[str]:
        """What a user should know before exporting: re-quantizing a quantized source."""
        kinds = sorted(set((self.data.source_types or {}).values()))
        if not kinds:
            return []
        return [
            f"the source model stores these weights as {', '.join(kinds)}: the chosen formats "
            "quantize already quantized values again, so quality is bounded by the source's "
            "quantization; allocate from an unquantized model where one exists"
        ]

    def with_importance(self, importance: Importance | None) -> Allocation:
        """A copy recording the importance that weights its units' clipping (None: none; also
        none when every unit is a float format, which has no clipping)."""
        record = None
        if importance is not None and not self.all_float:
            record = importance.restricted(u.name for u in self.data.units).record
        allocation = Allocation(self.data.model_copy(update={"importance": record}))
        _check_importance(allocation.data)
        return allocation

    @property
    def all_float(self) -> bool:
        """True when every unit is in a float format (nothing clipped, e.g. a KV-only run)."""
        return all(parse_format(u.format).is_float for u in self.data.units)

    def importance(self) -> Importance | None:
        """The recorded importance (see :attr:`AllocationData.importance`), or None."""
        record = self.data.importance
        return None if record is None else record.decode()

    # --- presentation ----------------------------------------------------------------------
    def table(self) -> str:
        """Per-unit table: unit, format, bits per weight, weights, predicted loss."""
        width = max(len(u.name) for u in self.data.units)
        lines = [f"{'unit':<{width}}  {'format':<10} {'bits':>6} {'weights':>10} {'pred.loss':>10}"]
        for u in self.data.units:
            loss = "" if u.predicted_loss is None else f"{u.predicted_loss:10.3g}"
            lines.append(
                f"{u.name:<{width}}  {u.format:<10} {u.bits_per_weight:6.3f} "
                f"{u.numel:10d} {loss:>10}"
            )
        lines.append(self.summary())
        return "\n".join(lines)

    def layer_table(self) -> str:
        """Per-layer view: average bits of the layer and the format of each role."""
        by_layer: dict[int, list[UnitChoice]] = defaultdict(list)
        for u in self.data.units:
            by_layer[u.layer].append(u)
        roles = list(dict.fromkeys(u.role for u in self.data.units))
        lines = ["layer  bits   " + " ".join(f"{r:>10}" for r in roles)]
        for layer in sorted(by_layer):
            units = by_layer[layer]
            bits = sum(parse_format(u.format).storage_bits(u.shape) for u in units)
            avg = bits / sum(u.numel for u in units)
            fmt = {u.role: u.format for u in units}
            lines.append(
                f"{layer:5d}  {avg:5.2f}  " + " ".join(f"{fmt.get(r, '-'):>10}" for r in roles)
            )
        lines.append(self.summary())
        return "\n".join(lines)

    def kv_table(self) -> str:
        """Per-layer KV formats and, for a joint budget, the memory split (empty without KV)."""
        d = self.data
        if d.kv is None:
            return ""
        parts = [d.kv.table()]
        if d.joint is not None:
            parts.append(d.joint.report())
        return "\n".join(parts)

    def summary(self) -> str:
        """One line: achieved bits against the budget, size, predicted loss."""
        d = self.data
        text = (
            f"avg bits {d.avg_bits:.4f} (budget {d.budget.describe()}) | {d.bytes / 2**20:.2f} MiB "
            f"for {d.numel:,} weights in {len(d.units)} units | "
            f"{d.excluded_numel:,} weights left out"
        )
        if d.target not in (None, "bitalloc"):
            text += f" | target {d.target}"
            if self.outside_bytes is not None:
                text += f", other tensors {self.outside_bytes / 2**20:.2f} MiB"
        if d.predicted_loss is not None:
            text += f" | predicted loss +{d.predicted_loss:.4f}"
        if d.scale_folding is not None:
            text += f" | scale folding (alpha {d.scale_folding.alpha:g})"
        if d.importance is not None:
            text += " | importance-weighted clipping"
        if d.kv is not None:
            text += f" | KV {d.kv.avg_bits:.3f} bits/element, {d.kv.bytes / 2**20:.2f} MiB"
        return text

    # --- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON document (see :class:`AllocationData`)."""
        return self.data.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temporary file, then rename)."""
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        """Read and validate an allocation written by :meth:`save`."""
        allocation = cls(read_model(Path(path), AllocationData, "allocation", _upgrade))
        _check_loaded(allocation.data)
        return allocation

    # --- use -------------------------------------------------------------------------------
    def apply(
        self,
        model: nn.Module,
        *,
        inplace: bool = False,
        packed: bool = False,
        cpu_path: str = "auto",
        progress: bool = True,
        calibration: torch.Tensor | None = None,
        sequential: bool = False,
    ) -> nn.Module:
        """Quantize ``model`` per the allocation (a deep copy unless ``inplace``).

        Units in ``+gptq`` formats quantize with their inputs' Gram matrices: the ones the run
        gathered when this is the object :func:`bitalloc.allocate` returned, else gathered
        again from ``calibration`` (the calibration windows, ``(n, seq_len)`` token ids: the
        same text gives the model that was measured). ``sequential`` (needs ``calibration``)
        quantizes block by block with each block's inputs from the already quantized blocks
        before it (:mod:`bitalloc.sequential`).

        By default the weights are fake-quantized: replaced by Q(W) in their own dtype. With
        ``packed=True`` each unit becomes a :class:`~bitalloc.kernels.QuantLinear` holding its
        packed codes (an :class:`~bitalloc.kernels.Float16Linear` for ``fp16``), so the units
        take the allocation's bytes; ``cpu_path`` picks their CPU kernel (``auto`` measures);
        ``progress`` shows a bar while packing.
        Save the result with :func:`bitalloc.packed.save_packed`.

        When the allocation records scale folding (``data.scale_folding``), its formats were
        chosen for the folded weights, so the recorded scales are folded into the target (the
        copy, or ``model`` itself when ``inplace``) before quantizing; a model already folded by
        this record (see :func:`bitalloc.folding_record.is_folded`) is not folded again, and one
        folded for another allocation is refused. Pass the original model, not a saved folded
        one: the mark that prevents folding twice does not survive saving.

        Every unit must exist in the model with the recorded shape; otherwise nothing is changed
        and :class:`BitallocError` is raised.
        """
        self.check_model(model)
        record = self.data.scale_folding
        if packed:
            from bitalloc.packed import check_policy, pack_model

            check_policy(cpu_path)  # before any copy or fold
        target = model if inplace else copy.deepcopy(model)
        if record is not None:
            apply_recorded_(target, record)  # no-op when already folded by this record
        importance = self._importance_for(target, calibration, sequential, progress)
        if sequential:
            from bitalloc.sequential import apply_sequential_

            if packed:
                raise BitallocError(
                    "sequential applies fake-quantized weights; pack its result by applying "
                    "without sequential, or leave packed off"
                )
            return apply_sequential_(
                target, self.formats, calibration, importance, progress=progress
            )
        if packed:
            return pack_model(
                target,
                self.formats,
                inplace=True,
                cpu_path=cpu_path,
                progress=progress,
                importance=importance,
            )
        return fake_quantize_(target, self.formats, importance)

    def _importance_for(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        sequential: bool,
        progress: bool,
    ) -> Importance | None:
        """The importance to quantize with: the record, with the Gram matrices ``+gptq`` units
        need (live, or gathered from ``calibration``)."""
        recorded = self.importance()
        if sequential and calibration is None:
            raise BitallocError(
                "sequential quantization runs the calibration windows through the model: pass "
                "calibration= (token ids, (n, seq_len))"
            )
        if recorded is None or not self.uses_grams or sequential:
            # No recorded importance: the run quantized with none (plain rounding), and so
            # does applying it, +gptq and +rht included.
            return recorded
        if self._live_importance is not None:
            return self._live_importance
        if calibration is None:
            raise BitallocError(
                "this allocation has +gptq formats, whose codes depend on the Gram matrices of "
                "the calibration inputs, which allocations do not store; pass calibration= (the "
                "calibration windows, (n, seq_len) token ids; bitalloc's CLI passes its text's)"
            )
        from bitalloc.sequential import gram_importance

        return gram_importance(model, self.formats, calibration, recorded, progress=progress)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`BitallocError` unless every unit exists in ``model`` with its shape."""
        missing, wrong = [], []
        for u in self.data.units:
            try:
                shape = tuple(get_linear(model, u.name).weight.shape)
            except BitallocError:
                missing.append(u.name)
                continue
            if shape != tuple(u.shape):
                wrong.append(f"{u.name} is {shape}, allocation says {tuple(u.shape)}")
        if missing:
            raise BitallocError(
                f"{len(missing)} of {len(self.data.units)} units in the allocation do not exist in "
                f"this model (first: {missing[0]!r}); use an allocation made for this model"
            )
        if wrong:
            raise BitallocError(f"unit shapes differ from the allocation: {wrong[0]}")

    def __repr__(self) -> str:
        return f"Allocation({self.summary()})"


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    # Version 1 recorded one number: the bound on the weights' average bits that the solve
    # respected (the request, the tighter of avg_bits and max_bytes, 16 for the fp16 weights
    # of a KV-only allocation, or the weights' share of a joint budget).
    budget = raw.get("budget")
    if (
        raw.get("version") == 1
        and isinstance(budget, (int, float))
        and not isinstance(budget, bool)
    ):
        return {**raw, "budget": {"avg_bits": budget}}
    return raw


def _check_consistent(data: AllocationData) -> None:
    if not 1 <= data.version <= ALLOCATION_VERSION:
        newer = data.version > ALLOCATION_VERSION
        raise BitallocError(
            f"allocation version {data.version} is not supported (this bitalloc reads versions 1 "
            f"to {ALLOCATION_VERSION}); "
            + ("upgrade bitalloc to read it" if newer else "re-create the allocation")
        )
    if not data.units:
        raise BitallocError("an allocation needs at least one unit")
    _check_units(data)
    _check_budget(data)
    _check_losses(data)
    if data.scale_folding is not None:
        data.scale_folding.check()
    _check_importance(data)
    if data.kv is not None:
        data.kv.check(joint=data.joint is not None)
    if data.joint is not None:
        if data.kv is None:
            raise BitallocError("a joint memory budget needs the KV formats it chose (kv)")
        data.joint.check()
        if not math.isclose(data.joint.kv_bytes, data.kv.bytes, rel_tol=1e-9) or not math.isclose(
            data.joint.weight_bytes, data.bytes, rel_tol=1e-9
        ):
            raise BitallocError(
                f"the joint budget's weight or KV bytes differ from the allocation's; {EDITED}"
            )
        data.joint.check_parts(
            weight_loss=data.predicted_loss,
            kv_loss=data.kv.predicted_loss,
            excluded_numel=data.excluded_numel,
        )


def _check_importance(data: AllocationData) -> None:
    if data.importance is None:
        return
    vectors = data.importance.decode().values
    for u in data.units:
        value = vectors.get(u.name)
        if value is None:
            raise BitallocError(f"{u.name} has no importance vector in the record; {EDITED}")
        if value.numel() != u.shape[1]:
            raise BitallocError(
                f"{u.name}: importance vector of {value.numel()} values for {u.shape[1]} input "
                f"columns; {EDITED}"
            )
    extra = sorted(set(vectors) - {u.name for u in data.units})
    if extra:
        raise BitallocError(f"importance recorded for units not allocated ({extra[0]}); {EDITED}")


def _check_units(data: AllocationData) -> None:
    names = [u.name for u in data.units]
    if len(set(names)) != len(names):
        raise BitallocError("the allocation lists a unit more than once")
    total = 0
    for u in data.units:
        if not all(0 < d <= MAX_DIMENSION for d in u.shape):
            raise BitallocError(f"{u.name}: shape {u.shape} is not a weight matrix's; {EDITED}")
        fmt = parse_format(u.format)
        if u.numel != u.shape[0] * u.shape[1]:
            raise BitallocError(f"{u.name}: numel {u.numel} does not match shape {u.shape}")
        expected = fmt.bits_per_weight(u.shape)
        if not math.isclose(u.bits_per_weight, expected, rel_tol=1e-9):
            raise BitallocError(
                f"{u.name}: bits_per_weight {u.bits_per_weight} does not match {u.format} on "
                f"shape {u.shape} ({expected}); {EDITED}"
            )
        total += fmt.storage_bits(u.shape)
    numel = sum(u.numel for u in data.units)
    if (
        total != data.total_bits
        or numel != data.numel
        or not math.isclose(data.avg_bits, total / numel, rel_tol=1e-9)
        or not math.isclose(data.bytes, total / 8, rel_tol=1e-12)
    ):
        raise BitallocError(
            f"the summary (avg_bits {data.avg_bits}, total_bits {data.total_bits}, bytes "
            f"{data.bytes}, numel {data.numel}) does not match its units ({total / numel}, "
            f"{total}, {total / 8}, {numel}); {EDITED}"
        )
    excluded = [p.name for p in data.excluded]
    if len(set(excluded) | set(names)) != len(excluded) + len(names):
        raise BitallocError(f"a parameter is listed twice among units and excluded; {EDITED}")
    if any(p.numel <= 0 for p in data.excluded):
        raise BitallocError(f"an excluded parameter has no weights; {EDITED}")
    if data.excluded_numel != sum(p.numel for p in data.excluded):
        raise BitallocError(
            f"excluded_numel {data.excluded_numel} is not the sum of the excluded parameters "
            f"({sum(p.numel for p in data.excluded)}); {EDITED}"
        )


def _check_budget(data: AllocationData) -> None:
    budget = data.budget
    budget.check()
    if budget.avg_bits is not None and data.avg_bits > budget.avg_bits * (1 + 1e-9):
        raise BitallocError(
            f"the allocation takes {data.avg_bits:.6f} bits per weight, over its budget of "
            f"{budget.avg_bits:g}; {EDITED}"
        )
    if budget.max_bytes is not None and data.bytes > budget.max_bytes * (1 + 1e-9):
        raise BitallocError(
            f"the allocation takes {data.bytes:.0f} bytes, over its budget of "
            f"{budget.max_bytes:.0f}; {EDITED}"
        )
    if budget.kv_avg_bits is not None and (
        data.kv is None or data.kv.avg_bits > budget.kv_avg_bits * (1 + 1e-9)
    ):
        raise BitallocError(
            f"the KV cache is not within the budget of {budget.kv_avg_bits:g} bits per cached "
            f"element; {EDITED}"
        )
    if budget.memory_bytes is not None and (
        data.joint is None or not math.isclose(data.joint.memory_bytes, budget.memory_bytes)
    ):
        raise BitallocError(
            f"the memory budget of {budget.memory_bytes:.0f} bytes has no joint record that "
            f"matches it; {EDITED}"
        )


def _check_losses(data: AllocationData) -> None:
    if data.profile is not None:
        data.profile.check()
    losses = [u.predicted_loss for u in data.units]
    if any(x is None for x in losses):
        if data.predicted_loss is not None:
            raise BitallocError(f"predicted_loss is recorded but not every unit has one; {EDITED}")
    else:
        pairs = 0.0 if data.profile is None else data.profile.interaction_loss
        expected = float(sum(losses)) + pairs  # type: ignore[arg-type]
        if data.predicted_loss is None or not same_sum(data.predicted_loss, expected):
            raise BitallocError(
                f"predicted_loss {data.predicted_loss} is not the units' losses plus the "
                f"interaction terms ({expected}); {EDITED}"
            )
    if data.solver is not None:
        # The objective is compared with the predicted loss on load only (see _check_loaded).
        data.solver.check(None)
    if data.measured is not None:
        data.measured.check(_predicted_total(data))
    if data.repair is not None:
        data.repair.check(data.predicted_loss)


def _check_loaded(data: AllocationData) -> None:
    # A joint solve's objective also counts the KV cache's loss, and the weights' allocation
    # of a joint budget is built (and checked) before its joint record is attached; a saved
    # file is complete, so here the objective of a weights-only solve must be its prediction.
    if data.solver is not None and data.joint is None:
        data.solver.check(data.predicted_loss)


def _predicted_total(data: AllocationData) -> float | None:
    parts = [data.predicted_loss]
    if data.kv is not None:
        parts.append(data.kv.predicted_loss)
    return None if any(p is None for p in parts) else float(sum(parts))  # type: ignore[arg-type]
