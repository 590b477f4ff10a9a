"""Which CPU path each packed unit of a model runs, and why.

:func:`choose_cpu_paths` sets the path of every
:class:`~bitalloc.kernels.quant_linear.QuantLinear` of a model (measured with
:func:`~bitalloc.kernels.cpu.measure_paths`, or forced) and records the reason on the layer;
:func:`cpu_path_report` sums it up in one line for users.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import Float16Linear, QuantLinear

CPU_POLICIES = ("auto", *cpu.CPU_PATHS)

PackedLayer = QuantLinear | Float16Linear


def packed_layers(model: nn.Module) -> dict[str, PackedLayer]:
    """The packed units of ``model`` by module path, in network order."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, QuantLinear | Float16Linear)
    }


FP16_REASON = "fp16 unit: its weight is kept in 16 bits"


@dataclass(frozen=True)
class CpuPathChoice:
    """Which CPU path each packed unit runs and why (``reasons``, by unit), and the
    measurements behind the choice (keyed by ``format shape``; empty when a path was forced)."""

    paths: dict[str, str]
    timings: dict[str, tuple[cpu.PathTiming, ...]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Units per path."""
        out: dict[str, int] = defaultdict(int)
        for path in self.paths.values():
            out[path] += 1
        return dict(sorted(out.items()))


def check_policy(policy: str) -> None:
    """Raise unless ``policy`` is ``auto`` or a CPU path name."""
    if policy not in CPU_POLICIES:
        raise BitallocError(f"unknown CPU path {policy!r}; choose from {', '.join(CPU_POLICIES)}")


def choose_cpu_paths(
    model: nn.Module, policy: str = "auto", *, repeats: int = 5, progress: bool = True
) -> CpuPathChoice:
    """Set every :class:`QuantLinear`'s CPU path, and record why on the layer
    (``cpu_path_reason``) and in the returned choice.

    ``auto`` measures each path that supports a (format, shape) once, on the first unit of that
    kind, and gives all such units the fastest path whose output matches the dequantized
    reference (one decode row plus one 32-row batch). When that is ``int4pack`` but
    ``unpack-matmul`` wins at 512 rows, the units switch to unpacking above the batch size where
    the two measured lines cross. A named path is used wherever it applies, ``unpack-matmul``
    elsewhere. int4pack applies only where torch's kernel passed its probe on this CPU (see
    :func:`bitalloc.kernels.int4pack.int4pack_probe`); a 4-bit layer that torch then packs in
    a layout the probe did not predict runs unpack-matmul, and its reason says so.
    """
    check_policy(policy)
    paths: dict[str, str] = {}
    reasons: dict[str, str] = {}
    timings: dict[str, tuple[cpu.PathTiming, ...]] = {}
    decided: dict[str, tuple[str, int | None, str]] = {}
    layers = packed_layers(model)
    for name, layer in tqdm(layers.items(), desc="CPU paths", unit="unit", disable=not progress):
        if isinstance(layer, Float16Linear):
            paths[name], reasons[name] = "fp16", FP16_REASON
            continue
        key = f"{layer.format.name} {layer.shape[0]}x{layer.shape[1]}"
        if key not in decided:
            decided[key] = _decide(layer, policy, repeats, timings, key)
        path, switch, reason = decided[key]
        try:
            layer.set_cpu_path(path, reason)
        except BitallocError as exc:
            if path != cpu.INT4PACK:
                raise
            # The probe fits torch's layout on its own shapes; a shape it mispredicts is caught
            # by the read-back in codes_to_int4pack and runs unpack-matmul instead.
            path, switch, reason = cpu.UNPACK_MATMUL, None, f"int4pack refused: {exc}"
            decided[key] = (path, switch, reason)
            layer.set_cpu_path(path, reason)
        layer.int4pack_max_rows = switch
        paths[name], reasons[name] = path, reason
    return CpuPathChoice(paths, timings, reasons)


def _decide(
    layer: QuantLinear,
    policy: str,
    repeats: int,
    timings: dict[str, tuple[cpu.PathTiming, ...]],
    key: str,
) -> tuple[str, int | None, str]:
    """The path for ``layer`` under ``policy``, for int4pack the batch size above which
    unpack-matmul takes over (None: never), and why."""
    why_not = layer.cpu_path_unsupported(cpu.INT4PACK)
    if policy != "auto":
        if policy == cpu.INT4PACK and why_not:
            return cpu.UNPACK_MATMUL, None, f"int4pack was asked for but {why_not}"
        return policy, None, f"{policy} was asked for"
    if why_not:
        return cpu.UNPACK_MATMUL, None, f"the only path: int4pack cannot run it ({why_not})"
    try:
        measured = tuple(cpu.measure_paths(layer, cpu.CPU_PATHS, repeats=repeats))
    except BitallocError as exc:
        return cpu.UNPACK_MATMUL, None, f"int4pack refused: {exc}"
    timings[key] = measured
    correct = [t for t in measured if t.correct] or [
        t for t in measured if t.path == cpu.UNPACK_MATMUL
    ]
    best = min(correct, key=lambda t: t.total_s)
    reason = "measured fastest correct: " + ", ".join(
        f"{t.path} {t.total_s * 1e3:.3f} ms"
        + ("" if t.correct else f" (off the reference by {t.error:.1%})")
        for t in measured
    )
    unpack = next((t for t in correct if t.path == cpu.UNPACK_MATMUL), None)
    if best.path != cpu.INT4PACK or unpack is None:
        return best.path, None, reason
    switch = cpu.crossover_rows(best, unpack)
    if switch is not None:
        reason += f"; unpack-matmul above {switch} rows"
    return best.path, switch, reason


def cpu_path_report(model: nn.Module) -> str:
    """One line: packed units per CPU path and, where 4-bit units could use torch's int4
    kernel, whether it passed its probe on this CPU (and so which path they run and why)."""
    counts: dict[str, int] = defaultdict(int)
    eligible = False
    for layer in packed_layers(model).values():
        if isinstance(layer, Float16Linear):
            counts["fp16"] += 1
            continue
        counts[layer.cpu_path] += 1
        eligible = eligible or not cpu.int4pack_shape_unsupported(
            layer.bits, layer.group_size, layer.out_features, layer.in_features
        )
    line = "units per CPU path: " + ", ".join(f"{p} {n}" for p, n in sorted(counts.items()))
    if eligible:
        line += "; " + cpu.int4pack_probe().describe()
    return line
