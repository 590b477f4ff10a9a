"""The serialised KV part of an allocation: per attention layer its (key bits, value bits) pair,
the context and batch the cache was sized for, and, for a joint budget, the split of memory
between weights and KV cache beside the best separate allocations.

Every record is strict (unknown fields refused) and checked on load: each layer's bits must be
what its format stores at the recorded context, batch and head layout, and the totals must be
what the layers add up to, so an edited file cannot claim a size it does not have.
"""

from __future__ import annotations

import math

from bitalloc.errors import BitallocError
from bitalloc.kv.formats import KVFormat, parse_kv_format, stored_tokens
from bitalloc.records import EDITED, ProfileSummary, SolverSummary, Strict, same_sum

#: Bytes per parameter of the weights outside the allocation (embeddings, norms) in a joint
#: memory budget: serving stacks keep them in fp16/bf16.
FIXED_BYTES_PER_PARAMETER = 2


class KVChoice(Strict):
    """One attention layer's KV decision and what it stores at the allocation's context."""

    name: str
    layer: int
    format: str
    #: Stored bits per cached element, averaged over the context (scales and zeros included).
    bits_per_element: float
    #: Stored bits of this layer's keys and values at the context and batch.
    cache_bits: int
    predicted_loss: float | None = None
    #: The layer's sliding window (it stores ``min(context, window)`` tokens); None: full
    #: attention, every token of the context.
    window: int | None = None

    def stored_tokens(self, context: int) -> int:
        """Tokens this layer's cache holds at a context of ``context`` tokens."""
        return stored_tokens(context, self.window)


class KVAllocation(Strict):
    """Per-layer KV formats for one model, sized at ``context_len`` tokens x ``batch_size``."""

    context_len: int
    batch_size: int
    n_kv_heads: int
    head_dim: int
    #: The budget in average bits per cached element (None when set by a joint memory budget).
    budget: float | None = None
    avg_bits: float
    total_bits: int
    bytes: float
    predicted_loss: float | None = None
    layers: list[KVChoice]
    solver: SolverSummary | None = None
    profile: ProfileSummary | None = None

    @property
    def formats(self) -> dict[str, str]:
        """KV unit name -> KV format name."""
        return {c.name: c.format for c in self.layers}

    def elements(self) -> int:
        """Cached elements at the context and batch: K and V of every layer, head and stored
        token (a sliding-window layer stores at most its window)."""
        tokens = sum(c.stored_tokens(self.context_len) for c in self.layers)
        return 2 * self.n_kv_heads * self.head_dim * tokens * self.batch_size

    def uniform_avg_bits(self, fmt: KVFormat | str) -> float:
        """Bits per cached element of every layer at ``fmt`` (same context, batch and sliding
        windows): what a uniform cache of that format would average, exactly."""
        fmt = parse_kv_format(fmt)
        sizes = (self.context_len, self.batch_size, self.n_kv_heads, self.head_dim)
        total = sum(fmt.cache_bits(*sizes, c.window) for c in self.layers)
        return total / self.elements()

    def check(self, *, joint: bool = False) -> None:
        """Raise :class:`BitallocError` unless every layer's bits and the totals are consistent,
        the average is within the budget and the predicted loss is the layers' sum; ``joint``
        says the solver's objective covered the weights too (then it is not compared)."""
        if not self.layers:
            raise BitallocError("a KV allocation needs at least one attention layer")
        sizes = (self.context_len, self.batch_size, self.n_kv_heads, self.head_dim)
        if min(sizes) <= 0 or max(sizes) > 2**32:
            raise BitallocError(
                f"the KV allocation's context, batch, heads and head size {sizes} must be "
                f"positive counts; {EDITED}"
            )
        names = [c.name for c in self.layers]
        if len(set(names)) != len(names):
            raise BitallocError("the KV allocation lists a layer more than once")
        total = 0
        for c in self.layers:
            if c.window is not None and (isinstance(c.window, bool) or not 1 <= c.window <= 2**32):
                raise BitallocError(
                    f"{c.name}: sliding window {c.window} is not a positive count; {EDITED}"
                )
            fmt = parse_kv_format(c.format)
            bits = fmt.cache_bits(*sizes, c.window)
            per = fmt.bits_per_element(self.head_dim, self.n_kv_heads, self.context_len, c.window)
            if bits != c.cache_bits or not math.isclose(per, c.bits_per_element, rel_tol=1e-9):
                raise BitallocError(
                    f"{c.name}: {c.format} stores {bits} bits ({per:.4f} per element) at context "
                    f"{self.context_len} x batch {self.batch_size}, the file says {c.cache_bits}; "
                    "the file was edited inconsistently"
                )
            total += bits
        if total != self.total_bits or not math.isclose(
            self.avg_bits, total / self.elements(), rel_tol=1e-9
        ):
            raise BitallocError(
                f"the KV summary (avg_bits {self.avg_bits}, total_bits {self.total_bits}) does not "
                f"match its layers ({total / self.elements()}, {total}); the file was edited "
                "inconsistently"
            )
        if not math.isclose(self.bytes, total / 8, rel_tol=1e-12):
            raise BitallocError(f"the KV bytes {self.bytes} are not total_bits / 8; {EDITED}")
        if self.budget is not None and (
            self.budget <= 0 or self.avg_bits > self.budget * (1 + 1e-9)
        ):
            raise BitallocError(
                f"the KV cache takes {self.avg_bits:.6f} bits per element, over its budget of "
                f"{self.budget:g}; {EDITED}"
            )
        losses = [c.predicted_loss for c in self.layers if c.predicted_loss is not None]
        expected = float(sum(losses)) if len(losses) == len(self.layers) else None
        if (expected is None) != (self.predicted_loss is None) or (
            expected is not None
            and self.predicted_loss is not None
            and not same_sum(self.predicted_loss, expected)
        ):
            raise BitallocError(
                f"the KV predicted_loss {self.predicted_loss} is not the layers' sum {expected}; "
                f"{EDITED}"
            )
        if self.profile is not None:
            self.profile.check()
        if self.solver is not None:
            self.solver.check(None if joint else self.predicted_loss, "KV allocation")

    def table(self) -> str:
        """One row per layer: format, bits per element, MiB, predicted loss; then a summary."""
        width = max(len(c.name) for c in self.layers)
        lines = [f"{'kv unit':<{width}}  {'format':<14} {'bits':>6} {'MiB':>8} {'pred.loss':>10}"]
        for c in self.layers:
            loss = "" if c.predicted_loss is None else f"{c.predicted_loss:10.3g}"
            lines.append(
                f"{c.name:<{width}}  {c.format:<14} {c.bits_per_element:6.3f} "
                f"{c.cache_bits / 8 / 2**20:8.3f} {loss:>10}"
            )
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: bits per cached element against the budget, size, predicted loss."""
        budget = "" if self.budget is None else f" (budget {self.budget:g})"
        text = (
            f"KV cache: {self.avg_bits:.4f} bits per element{budget} | {self.bytes / 2**20:.2f} "
            f"MiB at {self.context_len} tokens x batch {self.batch_size} in {len(self.layers)} "
            "layers"
        )
        windows = sorted({c.window for c in self.layers if c.window is not None})
        if windows:
            sliding = sum(c.window is not None for c in self.layers)
            sizes = "/".join(map(str, windows))
            text += f" ({sliding} of them with a sliding window of {sizes} tokens)"
        if self.predicted_loss is not None:
            text += f" | predicted loss +{self.predicted_loss:.4f}"
        return text


class SeparateSplit(Strict):
    """One separate allocation at the joint budget's total: the KV cache gets the bytes of
    ``kv_share`` (a uniform palette pair) and the weights the rest, each solved on its own."""

    kv_share: str
    kv_bytes: float
    weight_avg_bits: float
    weight_loss: float
    #: Predicted KV loss when the layers choose pairs within the share (mixed precision).
    kv_loss_mixed: float
    #: Predicted KV loss with every layer at ``kv_share`` (the usual single cache dtype).
    kv_loss_uniform: float

    @property
    def total_mixed(self) -> float:
        """Predicted loss with mixed KV pairs within the share."""
        return self.weight_loss + self.kv_loss_mixed

    @property
    def total_uniform(self) -> float:
        """Predicted loss with every layer at the share's pair."""
        return self.weight_loss + self.kv_loss_uniform


class JointBudget(Strict):
    """One memory budget for weights and KV cache, and how it was spent.

    ``total_bytes`` = ``fixed_bytes`` (parameters outside the allocation at
    :data:`FIXED_BYTES_PER_PARAMETER` bytes each) + ``weight_bytes`` (the allocated units,
    codes, scales and zeros) + ``kv_bytes`` (the cache at the KV allocation's context and batch).
    """

    memory_bytes: float
    minimum_bytes: float
    fixed_bytes: float
    weight_bytes: float
    kv_bytes: float
    total_bytes: float
    weight_loss: float
    kv_loss: float
    #: Separate allocations at the same total, one per KV share (see :class:`SeparateSplit`).
    separate: list[SeparateSplit] = []

    @property
    def predicted_loss(self) -> float:
        """Predicted loss of the joint choice (weights + KV)."""
        return self.weight_loss + self.kv_loss

    def best_separate(self, *, uniform_kv: bool = False) -> SeparateSplit | None:
        """The separate allocation with the lowest predicted loss (with uniform KV when asked)."""
        if not self.separate:
            return None
        key = (lambda s: s.total_uniform) if uniform_kv else (lambda s: s.total_mixed)
        return min(self.separate, key=key)

    def check(self) -> None:
        """Raise :class:`BitallocError` unless the parts add up and fit the budget."""
        parts = self.fixed_bytes + self.weight_bytes + self.kv_bytes
        if not math.isclose(parts, self.total_bytes, rel_tol=1e-9):
            raise BitallocError(
                f"the joint budget's parts add up to {parts} bytes, the file says "
                f"{self.total_bytes}; the file was edited inconsistently"
            )
        if self.total_bytes > self.memory_bytes * (1 + 1e-9):
            raise BitallocError(
                f"the joint allocation takes {self.total_bytes:.0f} bytes, over its budget of "
                f"{self.memory_bytes:.0f}; the file was edited inconsistently"
            )

    def check_parts(
        self, *, weight_loss: float | None, kv_loss: float | None, excluded_numel: int
    ) -> None:
        """Raise :class:`BitallocError` unless the recorded losses are the allocation's
        (``weight_loss``, ``kv_loss``; None: not recorded there), the fixed bytes are the
        parameters left out at :data:`FIXED_BYTES_PER_PARAMETER`, and the total is at least
        the recorded minimum."""
        for name, recorded, actual in (
            ("weight_loss", self.weight_loss, weight_loss),
            ("kv_loss", self.kv_loss, kv_loss),
        ):
            if actual is not None and not same_sum(recorded, actual):
                raise BitallocError(
                    f"the joint budget's {name} {recorded} is not the allocation's {actual}; "
                    f"{EDITED}"
                )
        fixed = float(FIXED_BYTES_PER_PARAMETER * excluded_numel)
        if not math.isclose(self.fixed_bytes, fixed, rel_tol=1e-12):
            raise BitallocError(
                f"the joint budget's fixed_bytes {self.fixed_bytes} are not the {excluded_numel} "
                f"parameters left out at {FIXED_BYTES_PER_PARAMETER} bytes each; {EDITED}"
            )
        if self.total_bytes < self.minimum_bytes * (1 - 1e-9):
            raise BitallocError(
                f"the joint allocation takes {self.total_bytes:.0f} bytes, under the recorded "
                f"minimum {self.minimum_bytes:.0f}; {EDITED}"
            )

    def report(self) -> str:
        """The split of the budget and the comparison with the best separate allocations."""
        mib = 2**20
        lines = [
            f"memory budget {self.memory_bytes / mib:.2f} MiB "
            f"(minimum {self.minimum_bytes / mib:.2f} MiB): "
            f"weights {self.weight_bytes / mib:.2f} + KV cache {self.kv_bytes / mib:.2f} + "
            f"other parameters {self.fixed_bytes / mib:.2f} = {self.total_bytes / mib:.2f} MiB",
            f"joint: predicted loss {self.predicted_loss:.4f} (weights {self.weight_loss:.4f}, "
            f"KV {self.kv_loss:.4f})",
        ]
        for label, uniform in (("mixed KV", False), ("uniform KV", True)):
            best = self.best_separate(uniform_kv=uniform)
            if best is None:
                continue
            total = best.total_uniform if uniform else best.total_mixed
            ratio = total / self.predicted_loss if self.predicted_loss > 0 else math.inf
            kv_loss = best.kv_loss_uniform if uniform else best.kv_loss_mixed
            lines.append(
                f"best separate ({label}, KV share {best.kv_share} = "
                f"{best.kv_bytes / mib:.2f} MiB, "
                f"weights {best.weight_avg_bits:.3f} bits): predicted loss {total:.4f} "
                f"(weights {best.weight_loss:.4f}, KV {kv_loss:.4f}) = {ratio:.3f}x joint"
            )
        return "\n".join(lines)
