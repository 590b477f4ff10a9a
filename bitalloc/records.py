"""Strict, frozen pydantic records shared by the serialised results (allocations, KV
allocations): unknown fields are refused, values cannot be reassigned.

Every number a record holds that can be recomputed from the rest of the file is checked by the
record's ``check`` (called when an allocation is built or loaded), so an edited file cannot claim
a result it does not have. Numbers that only a measurement can give (perplexities, wall times)
are kept as written.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from bitalloc.errors import BitallocError

#: Relative tolerance of a recomputed sum against the recorded one: the same terms added in
#: another order differ by rounding alone (about 1e-16 per term).
SUM_RTOL = 1e-9
#: Absolute floor of that tolerance, for losses near zero.
SUM_ATOL = 1e-12

EDITED = "the file was edited inconsistently"


def same_sum(recorded: float, recomputed: float) -> bool:
    """True when ``recorded`` equals ``recomputed`` up to the rounding of adding floats."""
    return math.isclose(recorded, recomputed, rel_tol=SUM_RTOL, abs_tol=SUM_ATOL)


class Strict(BaseModel):
    """Base of every serialised record: unknown fields refused, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(Strict):
    """What the user asked for, by resource (None: that resource was not bounded).

    This is the one meaning of "budget" in an allocation: the request. What the allocation
    achieves is recorded beside it (``avg_bits`` and ``bytes`` of the weights, the KV record's
    bits, the joint record's bytes) and checked against it.
    """

    #: Average stored bits per weight of the allocated units.
    avg_bits: float | None = None
    #: Stored bytes of the allocated units.
    max_bytes: float | None = None
    #: Average stored bits per cached element of the KV cache.
    kv_avg_bits: float | None = None
    #: One bound on weights (all, at 16 bits where not allocated) + KV cache bytes.
    memory_bytes: float | None = None
    #: Bytes of the whole exported file (``--file-size``, targets gguf and ct).
    max_file_bytes: float | None = None

    def check(self) -> None:
        """Raise :class:`BitallocError` unless every given bound is a positive finite number."""
        for name, value in self.model_dump().items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise BitallocError(
                    f"the budget's {name} {value} is not a number of bits or bytes above 0; "
                    + EDITED
                )

    def describe(self) -> str:
        """The request in a few words, e.g. ``3.25`` or ``memory 150.00 MiB``."""
        parts = []
        if self.avg_bits is not None:
            parts.append(f"{self.avg_bits:g}")
        if self.max_bytes is not None:
            parts.append(f"{self.max_bytes / 2**20:.2f} MiB")
        if self.kv_avg_bits is not None:
            parts.append(f"KV {self.kv_avg_bits:g}")
        if self.memory_bytes is not None:
            parts.append(f"memory {self.memory_bytes / 2**20:.2f} MiB")
        if self.max_file_bytes is not None:
            parts.append(f"file {self.max_file_bytes / 2**20:.2f} MiB")
        return ", ".join(parts) or "none"


class SolverSummary(Strict):
    """How the choice was made."""

    method: str
    status: str
    objective: float
    lower_bound: float | None = None
    gap: float | None = None
    wall_time_s: float

    def check(self, predicted_loss: float | None, what: str = "allocation") -> None:
        """Raise :class:`BitallocError` unless the bound and gap agree with the objective and,
        where given, the objective equals ``predicted_loss`` (the choice's summed prediction:
        pass None where the solver's objective covered more than this record, as in a joint
        weights + KV problem)."""
        scale = max(1.0, abs(self.objective))
        if self.wall_time_s < 0:
            raise BitallocError(f"the {what}'s solver wall time is negative; {EDITED}")
        if (self.lower_bound is None) != (self.gap is None):
            raise BitallocError(
                f"the {what}'s solver records a gap without a lower bound or the reverse; {EDITED}"
            )
        bound, gap = self.lower_bound, self.gap
        # The solvers clamp a bound within rounding of the objective to the objective.
        if (
            bound is not None
            and gap is not None
            and (bound > self.objective or not same_sum(gap, self.objective - bound))
        ):
            raise BitallocError(
                f"the {what}'s solver bound {bound} and gap {gap} do not fit its objective "
                f"{self.objective}; {EDITED}"
            )
        if predicted_loss is not None and not math.isclose(
            self.objective, predicted_loss, rel_tol=SUM_RTOL, abs_tol=SUM_ATOL * scale
        ):
            raise BitallocError(
                f"the {what}'s solver objective {self.objective} differs from its predicted loss "
                f"{predicted_loss}; {EDITED}"
            )


class ProfileSummary(Strict):
    """Which profile predicted the losses."""

    method: str
    tokens: int | None = None
    seconds: float | None = None
    model_fingerprint: str | None = None
    calibration_fingerprint: str | None = None
    cache: str | None = None
    #: Pairs with measured interaction terms in the objective (0: purely additive).
    interaction_pairs: int = 0
    interaction_formats: list[str] | None = None
    #: The pairwise terms' share of the predicted loss (included in ``predicted_loss``).
    interaction_loss: float = 0.0

    def check(self) -> None:
        """Raise :class:`BitallocError` unless the interaction record is self-consistent."""
        if self.interaction_pairs < 0:
            raise BitallocError(f"the profile summary counts {self.interaction_pairs} pairs")
        if self.interaction_pairs == 0 and self.interaction_loss != 0.0:
            raise BitallocError(
                f"the profile summary has interaction loss {self.interaction_loss} without "
                f"interaction pairs; {EDITED}"
            )


class ExcludedParameter(Strict):
    """A parameter left out of the allocation, reported separately: for an engine target, with
    the type the target's convention stores it in and its bytes in the exported file."""

    name: str
    numel: int
    type: str | None = None
    nbytes: int | None = None


class Measured(Strict):
    """Measured quality of the allocation beside uniform baselines (``fp16`` = unquantized)."""

    perplexity: float
    baselines: dict[str, float]
    baseline_avg_bits: dict[str, float]
    eval_tokens: int
    seq_len: int
    measured_loss_increase: float
    predicted_loss_increase: float
    #: With a KV allocation: the allocation's weights with every layer's cache at one pair
    #: (the uniform KV pairs nearest the allocation's KV bits), perplexity and bits per element.
    kv_baselines: dict[str, float] = {}
    kv_baseline_avg_bits: dict[str, float] = {}

    def check(self, predicted_total: float | None) -> None:
        """Raise :class:`BitallocError` unless the perplexities are positive, the loss increase
        is the log ratio of the allocation's and the unquantized perplexity, and the predicted
        increase is the allocation's ``predicted_total`` (when it has one)."""
        values = [self.perplexity, *self.baselines.values(), *self.kv_baselines.values()]
        if min(values) <= 0:
            raise BitallocError(f"a recorded perplexity is {min(values)}; {EDITED}")
        if self.eval_tokens <= 0 or self.seq_len <= 0:
            raise BitallocError(f"the measurement's token counts must be positive; {EDITED}")
        fp16 = self.baselines.get("fp16")
        if fp16 is not None and not same_sum(
            self.measured_loss_increase, math.log(self.perplexity) - math.log(fp16)
        ):
            raise BitallocError(
                f"measured_loss_increase {self.measured_loss_increase} is not "
                f"log({self.perplexity}) - log({fp16}) (the fp16 baseline); {EDITED}"
            )
        if predicted_total is not None and not same_sum(
            self.predicted_loss_increase, predicted_total
        ):
            raise BitallocError(
                f"the measurement's predicted_loss_increase {self.predicted_loss_increase} is "
                f"not the allocation's predicted loss {predicted_total}; {EDITED}"
            )


class RepairRound(Strict):
    """One round of verify-and-repair: the allocation at its start, predicted and measured
    loss increase (nats/token, on the repair windows), the groups then measured (unit names or
    ``layer N``), and what was done (``corrected``: the measured groups' terms rescaled;
    ``refined``: each measured unit's chosen format and its cheaper and richer neighbours put in
    as measured; or why it
    stopped: ``agrees``, ``budget spent``, ``nothing left``). ``direction`` says which way the
    prediction was off when the round acted: ``optimistic`` (measured above predicted) or
    ``pessimistic`` (below)."""

    avg_bits: float
    predicted: float
    measured: float
    groups_measured: list[str]
    action: str
    direction: str | None = None


class Repair(Strict):
    """What verify-and-repair measured and changed (losses are increases over the unquantized
    model in nats/token on ``tokens`` calibration tokens)."""

    tokens: int
    tolerance: float
    budget: int
    evaluations: int
    predicted_before: float
    measured_before: float
    predicted_after: float
    measured_after: float
    changed: bool
    groups: str
    groups_measured: int
    rounds: list[RepairRound]
    wall_time_s: float
    #: Which measured candidate was returned: ``solver`` (the first choice), ``repair round N``
    #: or ``uniform FORMAT`` (a uniform allocation within the same budget), and why.
    chosen: str = "solver"
    reason: str | None = None
    #: Every other candidate measured on the repair windows: label -> loss increase (nats/token).
    candidates: dict[str, float] = {}
    #: Set when the profile was judged outside the regime where it can be trusted, and why;
    #: repair then measured the units that matter under their chosen format and its cheaper and
    #: richer neighbours instead of only rescaling the profile's terms.
    regime: str | None = None

    def check(self, predicted_loss: float | None) -> None:
        """Raise :class:`BitallocError` unless the counts are sane and ``predicted_after`` is
        the repaired allocation's ``predicted_loss`` (when it has one)."""
        if min(self.tokens, self.budget, self.evaluations, self.groups_measured) < 0:
            raise BitallocError(f"the repair record holds a negative count; {EDITED}")
        if predicted_loss is not None and not same_sum(self.predicted_after, predicted_loss):
            raise BitallocError(
                f"the repair's predicted_after {self.predicted_after} is not the allocation's "
                f"predicted loss {predicted_loss}; {EDITED}"
            )
