"""The numbers behind the report's plots, extracted from profiles, allocations, frontiers and
studies without any plotting (so tests can check them against their sources).

Heavy modules (torch through :mod:`bitalloc.formats`, optuna) are imported where used: the
``bitalloc dashboard`` command imports this module and should start quickly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitalloc.errors import BitallocError

if TYPE_CHECKING:
    import optuna

    from bitalloc.allocation import Allocation, UnitChoice
    from bitalloc.sensitivity import Profile

#: Column order of the sensitivity heatmap: the projections of a Llama-family block in the order
#: they run. Other roles (non-Llama models) follow in order of first appearance.
ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
#: Row label of units outside the numbered blocks (e.g. ``lm_head``).
OTHER_LAYER = "other"
# Perplexities compare to budgets with this slack: avg bits are ratios of integers computed in
# floating point, so an allocation exactly at the budget may read 1 ulp above it.
_BUDGET_SLACK = 1e-9

_LAYER_IN_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# --- profile -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SensitivityGrid:
    """A profile column laid out as layers (rows) x roles (columns).

    ``values[r][c]`` is the predicted loss increase of the unit at layer ``layers[r]`` and role
    ``roles[c]`` (summed when several units share the cell, e.g. experts), ``None`` where no
    unit exists; ``names`` holds the unit names of each cell.
    """

    fmt: str
    layers: list[str]
    roles: list[str]
    values: list[list[float | None]]
    names: list[list[list[str]]]


def unit_positions(profile: Profile) -> list[tuple[str, str]]:
    """(layer label, role) of every profile unit, in row order.

    Read from ``metadata["unit_info"]`` (written by ``bitalloc profile``); profiles without it
    fall back to the module path (``model.layers.3.self_attn.q_proj`` -> ("3", "q")).
    """
    info = profile.metadata.get("unit_info")
    by_name: dict[str, Mapping[str, Any]] = {}
    if isinstance(info, list):
        by_name = {str(d.get("name")): d for d in info if isinstance(d, Mapping)}
    positions = []
    for name in profile.units:
        record = by_name.get(name)
        if record is not None and "layer" in record and "role" in record:
            layer = record["layer"]
            label = str(int(layer)) if isinstance(layer, int) and layer >= 0 else OTHER_LAYER
            positions.append((label, str(record["role"])))
        else:
            positions.append(_position_from_name(name))
    return positions


def _position_from_name(name: str) -> tuple[str, str]:
    match = _LAYER_IN_NAME.search(name)
    layer = match.group(1) if match else OTHER_LAYER
    leaf = name.rsplit(".", 1)[-1]
    return layer, leaf.removesuffix("_proj")


def _sorted_layers(labels: Iterable[str]) -> list[str]:
    unique = set(labels)
    numbered = sorted((x for x in unique if x != OTHER_LAYER), key=int)
    return numbered + ([OTHER_LAYER] if OTHER_LAYER in unique else [])


def _sorted_roles(roles: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(roles))
    known = [r for r in ROLE_ORDER if r in seen]
    return known + [r for r in seen if r not in ROLE_ORDER]


def default_heatmap_format(formats: Sequence[str]) -> str:
    """The format the heatmap opens on: the integer format with the fewest bits per weight
    (where sensitivities differ most); the first format when none is an integer format."""
    from bitalloc.formats import parse_format

    if not formats:
        raise BitallocError("the profile has no formats")
    candidates = []
    for name in formats:
        try:
            fmt = parse_format(name)
        except BitallocError:
            continue
        if not fmt.is_float:
            candidates.append((fmt.nominal_bits, fmt.bits, name))
    return min(candidates)[2] if candidates else formats[0]


def sensitivity_grid(profile: Profile, fmt: str) -> SensitivityGrid:
    """The profile's column for ``fmt`` as a layers x roles grid (see :class:`SensitivityGrid`)."""
    column = profile.column(fmt)
    positions = unit_positions(profile)
    layers = _sorted_layers(layer for layer, _ in positions)
    roles = _sorted_roles([role for _, role in positions])
    row = {layer: i for i, layer in enumerate(layers)}
    col = {role: j for j, role in enumerate(roles)}
    values: list[list[float | None]] = [[None] * len(roles) for _ in layers]
    names: list[list[list[str]]] = [[[] for _ in roles] for _ in layers]
    for unit, (layer, role), value in zip(profile.units, positions, column):
        i, j = row[layer], col[role]
        current = values[i][j]
        values[i][j] = float(value) + (0.0 if current is None else current)
        names[i][j].append(unit)
    return SensitivityGrid(fmt, layers, roles, values, names)


# --- allocation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerBits:
    """Average stored bits per weight of one layer's units, with the units themselves."""

    layer: str
    avg_bits: float
    units: list[UnitChoice]


def layer_bits(allocation: Allocation) -> list[LayerBits]:
    """Average bits per weight of every layer (stored bits / weights, as ``layer_table``)."""
    from bitalloc.formats import parse_format

    by_layer: dict[str, list[UnitChoice]] = {}
    for u in allocation.data.units:
        label = str(u.layer) if u.layer >= 0 else OTHER_LAYER
        by_layer.setdefault(label, []).append(u)
    result = []
    for label in _sorted_layers(by_layer):
        units = by_layer[label]
        bits = sum(parse_format(u.format).storage_bits(u.shape) for u in units)
        result.append(LayerBits(label, bits / sum(u.numel for u in units), units))
    return result


def role_order(allocation: Allocation) -> list[str]:
    """The roles of an allocation's units in heatmap column order."""
    return _sorted_roles([u.role for u in allocation.data.units])


# --- study -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialPoint:
    """A finished search trial: its two objectives and where its allocation came from."""

    number: int
    avg_bits: float
    perplexity: float
    source: str
    predicted_loss: float | None = None


@dataclass(frozen=True)
class TrialCounts:
    """How many trials a study holds, by state."""

    complete: int
    failed: int
    running: int
    other: int

    @property
    def total(self) -> int:
        """Every trial, whatever its state."""
        return self.complete + self.failed + self.running + self.other


def finite_float(x: Any) -> float | None:
    """``x`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def study_points(study: optuna.Study) -> list[TrialPoint]:
    """The finished trials with finite objectives and positive perplexity, by trial number.

    Unfinished (FAIL, RUNNING, PRUNED) trials and trials whose values are not
    ``[avg_bits, perplexity]`` are left out: they cannot be placed on the plots.
    """
    import optuna

    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        values = trial.values or []
        if len(values) != 2:
            continue
        bits, ppl = finite_float(values[0]), finite_float(values[1])
        if bits is None or ppl is None or ppl <= 0:
            continue
        attrs = trial.user_attrs
        points.append(
            TrialPoint(
                number=trial.number,
                avg_bits=bits,
                perplexity=ppl,
                source=str(attrs.get("source") or "unknown"),
                predicted_loss=finite_float(attrs.get("predicted_loss")),
            )
        )
    return sorted(points, key=lambda p: p.number)


def trial_counts(study: optuna.Study) -> TrialCounts:
    """Trials by state (readers ignore unfinished trials except for these counts)."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(TrialState.COMPLETE)
    failed = states.count(TrialState.FAIL)
    running = states.count(TrialState.RUNNING) + states.count(TrialState.WAITING)
    return TrialCounts(complete, failed, running, len(states) - complete - failed - running)


def source_group(source: str) -> str:
    """The legend group of a trial source: ``seed:lagrangian@3.25`` -> ``seed: lagrangian``
    (one colour per solver, whatever the budget), ``sampler`` -> ``sampler``."""
    if source.startswith("seed:"):
        return "seed: " + source[len("seed:") :].split("@", 1)[0]
    return source


def within_budget(points: Sequence[TrialPoint], budget: float | None) -> list[TrialPoint]:
    """The points whose average bits meet ``budget`` (all of them when it is None)."""
    return [p for p in points if _meets(p, budget)]


def _meets(point: TrialPoint, budget: float | None) -> bool:
    return budget is None or point.avg_bits <= budget + _BUDGET_SLACK


def best_within_budget(
    points: Sequence[TrialPoint], budget: float | None
) -> list[tuple[int, float]]:
    """(trial number, best perplexity so far) at every trial number from the first trial within
    the budget on (all trials when ``budget`` is None)."""
    best = math.inf
    steps = []
    for p in sorted(points, key=lambda p: p.number):
        if _meets(p, budget):
            best = min(best, p.perplexity)
        if math.isfinite(best):
            steps.append((p.number, best))
    return steps


def search_settings(study: optuna.Study) -> dict[str, Any]:
    """The ``bitalloc`` user attribute of a search study (empty when the study has none)."""
    settings = study.user_attrs.get("bitalloc")
    return dict(settings) if isinstance(settings, Mapping) else {}


# --- baselines and references ------------------------------------------------------------------
def fp16_perplexity(
    *, allocation: Allocation | None, frontier: Mapping[str, Any] | None, study: Any
) -> float | None:
    """The unquantized model's perplexity from whichever input records it (study first: its
    evaluation windows are the ones the trials were measured on)."""
    candidates: list[Any] = []
    if study is not None:
        candidates.append(study.user_attrs.get("fp16_perplexity"))
    if frontier is not None:
        candidates.append(frontier.get("fp16_perplexity"))
    if allocation is not None and allocation.measured is not None:
        candidates.append(allocation.measured.baselines.get("fp16"))
    for value in candidates:
        value = finite_float(value)
        if value is not None and value > 0:
            return value
    return None


def uniform_baselines(
    *, allocation: Allocation | None, study: Any
) -> dict[str, tuple[float, float]]:
    """Uniform baselines {format: (avg_bits, perplexity)}, fp16 excluded (drawn as a line)."""
    found: dict[str, tuple[float, float]] = {}
    if allocation is not None and allocation.measured is not None:
        m = allocation.measured
        for name, ppl in m.baselines.items():
            bits = m.baseline_avg_bits.get(name)
            if bits is not None and finite_float(ppl) is not None:
                found[name] = (float(bits), float(ppl))
    uniform = study.user_attrs.get("uniform") if study is not None else None
    if isinstance(uniform, Mapping):
        for name, record in uniform.items():
            if not isinstance(record, Mapping):
                continue
            bits, ppl = finite_float(record.get("avg_bits")), finite_float(record.get("perplexity"))
            if bits is not None and ppl is not None:
                found[str(name)] = (bits, ppl)
    found.pop("fp16", None)
    return {k: v for k, v in found.items() if v[1] > 0}


def frontier_points(frontier: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The frontier's points as dicts, checked enough to plot (malformed -> BitallocError)."""
    points = frontier.get("points")
    if not isinstance(points, list) or not all(isinstance(p, Mapping) for p in points):
        raise BitallocError(
            "the frontier has no list of points; pass the JSON written by "
            "`bitalloc frontier --out FILE`"
        )
    for p in points:
        if finite_float(p.get("avg_bits")) is None:
            raise BitallocError(f"a frontier point has no finite avg_bits: {dict(p)!r:.200}")
    return [dict(p) for p in points]


def measured_frontier_points(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points with a measured perplexity (finite and positive), by average bits."""
    kept = [dict(p) for p in points if (finite_float(p.get("perplexity")) or 0) > 0]
    return sorted(kept, key=lambda p: p["avg_bits"])


def predicted_frontier_points(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points with a predicted loss increase (finite and non-negative), by average bits;
    measured or not, since the solver predicts every point it returns."""
    kept = [dict(p) for p in points if _non_negative(finite_float(p.get("predicted_loss")))]
    return sorted(kept, key=lambda p: p["avg_bits"])


def _non_negative(x: float | None) -> bool:
    # 0.0 is a real prediction (an all-fp16 allocation), so no truthiness test here.
    return x is not None and x >= 0


def measured_loss_increase(perplexity: float, fp16: float) -> float:
    """Measured loss increase in nats per token: ln(ppl) - ln(fp16 ppl)."""
    return math.log(perplexity) - math.log(fp16)
