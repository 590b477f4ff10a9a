"""The profiler skeleton (:class:`BaseProfiler`) and the on-disk profile cache."""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.config.messages import CALIBRATION_TOKENS
from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, parse_format
from bitalloc.models import Unit, cache_root
from bitalloc.sensitivity.monotone import allowed_by_shapes, bit_chains, cap_chains
from bitalloc.sensitivity.profile import Profile, cache_key

if TYPE_CHECKING:
    from bitalloc.importance import Importance


@dataclass
class Statistics:
    """What a profiler gathered from the calibration windows.

    ``tokens``: calibration tokens that went into the result; ``usable`` and ``skipped``: the
    batches (windows, probes) used and skipped as non-finite; ``state``: whatever the
    profiler's :meth:`BaseProfiler.unit_losses` needs (accumulators, traces); ``metadata``:
    the profiler's own metadata entries; ``table``: set by a :meth:`BaseProfiler.measure` that
    fills the whole units x formats table at once (None: the skeleton asks for rows).
    ``importance`` and ``units`` (unit names in order) are set by the skeleton: see
    :meth:`importance_of`.
    """

    tokens: int
    usable: int
    skipped: int
    state: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    table: np.ndarray | None = None
    importance: Importance | None = None
    units: tuple[str, ...] = ()

    def importance_of(self, index: int) -> torch.Tensor | None:
        """The importance vector that weights unit ``index``'s clipping search (None: plain
        squared error); pass it to :func:`~bitalloc.formats.fake_quantize_each`."""
        if self.importance is None:
            return None
        return self.importance.of(self.units[index])


class BaseProfiler(ABC):
    """Estimates what each unit loses under each format.

    The contract every profiler keeps (checked for each registered one by
    ``tests/sensitivity/test_contract.py``):

    - :meth:`profile` takes the model (not modified: any temporary change is undone before it
      returns, also on error), the units in network order, the palette, calibration token
      windows of shape (n_windows, seq_len) and optionally each unit's importance
      (:mod:`bitalloc.importance`). It returns a :class:`Profile` whose rows are the units in
      the given order and whose columns are the palette's format names in order.
    - Every quantized weight it scores is quantized as the run will quantize it: with the
      importance given, each unit's clipping search is weighted by its vector.
    - Values are finite and non-negative predicted increases of the language-model loss (mean
      next-token cross-entropy, in nats) when only that unit takes that format (KV profilers
      may record another additive measure and say so in their metadata).
    - Along each format ladder (one int group size), a higher rung never predicts more loss.
    - A format that cannot store a unit (:meth:`~bitalloc.formats.Format.allows` refuses its
      shape: llama.cpp's K-quants on a 576-wide input) is never measured for it; its entry is
      the placeholder 0, which the problem masks out.
    - ``metadata`` holds at least ``method``, ``tokens`` (calibration tokens used),
      ``skipped_batches``, ``monotone_fixes`` and ``seconds``.
    - :meth:`options` returns every setting that changes the result; it keys the cache, so two
      profilers with equal options on equal inputs must give equal profiles.
    - Batches whose statistics are not finite are skipped and counted; when none is usable the
      profiler raises :class:`~bitalloc.errors.BitallocError`.

    :meth:`profile` is a template method that keeps the contract for every subclass: it checks
    the inputs, times the run, opens one progress bar (``self.progress``), asks the subclass to
    measure, refuses a run with no usable batch, caps the table so that more bits never predict
    more loss (counted as ``monotone_fixes``) and writes the metadata. A subclass implements
    only what it measures, through these hooks:

    - :meth:`gather` ``(model, units, calibration, bar)`` -> :class:`Statistics`: run the model
      over the calibration windows and collect what the table needs (as GPTQ gathers its
      Hessians before solving). It restores every change it makes to the model (flags, modes,
      hooks), also on error, advances ``bar`` once per window or probe, and does not build
      the table.
    - :meth:`reuse` ``(model, units, calibration, bar, importance)`` -> :class:`Statistics` or
      None: optional; statistics that the run's importance already holds (the ``output``
      profiler takes the input Gram matrices gathered for ``+gptq`` formats), in place of
      :meth:`gather`.
    - :meth:`unit_losses` ``(index, statistics, palette)`` -> one row: the values of unit
      ``index`` under each format, from the statistics alone (no model forward), quantizing
      with ``statistics.importance_of(index)``; the skeleton calls it under ``torch.no_grad``
      for each unit in order and advances the bar.
    - :meth:`measure` ``(model, units, palette, calibration, bar, importance)`` ->
      :class:`Statistics`: the whole measurement. The default runs :meth:`gather`, puts the
      importance in the statistics, then runs :meth:`unit_losses` per unit;
      a profiler whose measurements are per (unit, format) jobs (on a job pool, or one forward
      per KV layer and format) overrides it and returns the table in ``Statistics.table``.
    - :meth:`finalize` ``(table, statistics, model, units, palette)`` -> ``(table, metadata)``:
      an optional last step on the already capped table (e.g. one global scale that puts it in
      nats); it must keep the table non-negative and must not reorder values.

    Hooks do not write ``method``, ``tokens``, ``skipped_batches``, ``monotone_fixes`` or
    ``seconds``: the skeleton does. Subclasses also set ``name``, may set ``unit_kind`` (``kv``
    for KV-cache profilers), ``measures_on_pool`` (True when :meth:`measure` runs jobs that
    :mod:`bitalloc.jobs` can spread over Ray), ``progress_desc`` and ``progress_unit`` (the
    bar's first stage), and override :meth:`check_palette` / :meth:`check_units` /
    :meth:`monotone_chains` / :meth:`no_usable_batch` where their inputs differ.
    """

    name: ClassVar[str]
    #: What the rows are: ``weight`` (weight matrices) or ``kv`` (an attention layer's cache).
    unit_kind: ClassVar[str] = "weight"
    #: True when :meth:`measure` scores (unit, format) jobs on a pool (in process or on Ray).
    measures_on_pool: ClassVar[bool] = False
    #: The first stage of the progress bar: ``"{name}: {progress_desc}"``, in ``progress_unit``.
    progress_desc: ClassVar[str] = "statistics"
    progress_unit: ClassVar[str] = "window"
    progress: bool = True

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Settings that determine the result (used in the cache key)."""

    def profile(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[Any],
        calibration: torch.Tensor,
        importance: Importance | None = None,
    ) -> Profile:
        """Compute the units x formats table of predicted loss increase (see the class
        docstring for what every profiler guarantees); ``importance`` weights every clipping
        search as the run that uses the profile will."""
        if importance is not None:
            importance = importance.restricted(u.name for u in units)
        start = time.perf_counter()
        self.check_calibration(calibration)
        self.check_units(model, units)
        formats = self.check_palette(palette)
        # Pool-measuring profilers show the pool's bar (one per run of jobs) instead.
        with tqdm(
            desc=f"{self.name}: {self.progress_desc}",
            unit=self.progress_unit,
            disable=not self.progress or self.measures_on_pool,
        ) as bar:
            stats = self.measure(model, units, formats, calibration, bar, importance)
        if stats.usable == 0:
            raise BitallocError(self.no_usable_batch(stats.skipped))
        allowed = allowed_mask(units, formats)
        table, fixed = cap_chains(stats.table, self.monotone_chains(formats), allowed)
        table, extra = self.finalize(table, stats, model, units, formats)
        return Profile(
            units=tuple(u.name for u in units),
            formats=tuple(f.name for f in formats),
            loss=table,
            metadata={
                "method": self.name,
                "tokens": int(stats.tokens),
                "skipped_batches": int(stats.skipped),
                **stats.metadata,
                "monotone_fixes": fixed,
                **extra,
                "seconds": time.perf_counter() - start,
            },
        )

    def measure(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[Any],
        calibration: torch.Tensor,
        bar: tqdm,
        importance: Importance | None = None,
    ) -> Statistics:
        """Gather the statistics (or take them from ``importance``: :meth:`reuse`), then fill
        the table one unit at a time."""
        stats = self.reuse(model, units, calibration, bar, importance)
        if stats is None:
            stats = self.gather(model, units, calibration, bar)
        if stats.usable == 0:
            return stats
        stats.importance = importance
        stats.units = tuple(u.name for u in units)
        bar.set_description(f"{self.name}: formats")
        bar.unit = "unit"
        bar.reset(total=len(units))
        table = np.zeros((len(units), len(palette)))
        allowed = allowed_mask(units, palette)
        with torch.no_grad():
            for i in range(len(units)):
                # Only the formats that can store the unit are asked for; the others keep the
                # placeholder 0, which no solve may pick (see allowed_mask).
                cols = np.flatnonzero(allowed[i])
                table[i, cols] = self.unit_losses(i, stats, [palette[j] for j in cols])
                bar.update()
        stats.table = table
        return stats

    def gather(
        self, model: nn.Module, units: Sequence[Unit], calibration: torch.Tensor, bar: tqdm
    ) -> Statistics:
        """Statistics from the calibration windows (see the class docstring)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement gather() and unit_losses(), or measure()"
        )

    def reuse(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        calibration: torch.Tensor,
        bar: tqdm,
        importance: Importance | None,
    ) -> Statistics | None:
        """Statistics built from what ``importance`` already holds (the input Gram matrices of
        the same windows, for ``output``), or None (the default): :meth:`gather` them."""
        return None

    def unit_losses(self, index: int, statistics: Statistics, palette: Sequence[Any]) -> Any:
        """Unit ``index``'s value under each format (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement unit_losses()")

    def finalize(
        self,
        table: np.ndarray,
        statistics: Statistics,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[Any],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The final table and metadata entries about this step; by default the table."""
        return table, {}

    def monotone_chains(self, palette: Sequence[Any]) -> list[list[int]]:
        """Columns whose values must not rise along each chain (fewest bits first)."""
        return bit_chains(palette)

    def no_usable_batch(self, skipped: int) -> str:
        """The error message when every batch was skipped."""
        return (
            f"all {skipped} calibration windows gave non-finite statistics; check the model's "
            "weights (NaN/inf) or use a different calibration text"
        )

    def check_calibration(self, calibration: Any) -> None:
        """Refuse calibration that is not an (n_windows, seq_len >= 2) tensor of token ids."""
        if (
            not isinstance(calibration, torch.Tensor)
            or calibration.dim() != 2
            or calibration.is_floating_point()
            or calibration.is_complex()
        ):
            raise BitallocError("calibration must be an (n_windows, seq_len) tensor of token ids")
        if calibration.shape[1] < 2:
            raise BitallocError(
                f"calibration windows need 2+ tokens to score, got shape {tuple(calibration.shape)}"
            )

    def check_units(self, model: nn.Module, units: Sequence[Unit]) -> None:
        """Refuse an empty unit list."""
        if not units:
            raise BitallocError("no units to profile; pass at least one unit (check the filter)")

    def check_palette(self, palette: Sequence[Any]) -> list[Any]:
        """The palette as format objects (names are parsed), each listed once."""
        if isinstance(palette, str) or not palette:
            raise BitallocError(
                "the palette must be a non-empty list of formats or names such as "
                "['int4-g128', 'int8-g128', 'fp16']"
            )
        formats = [parse_format(f) if isinstance(f, str) else f for f in palette]
        for f in formats:
            if not isinstance(getattr(f, "name", None), str):
                raise BitallocError(f"palette entry {f!r} is not a format; give a name or format")
        names = [f.name for f in formats]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BitallocError(f"the palette lists {twice} more than once; list each once")
        return formats


class GradientProfiler(BaseProfiler):
    """Shared settings of the profilers that square loss gradients (``fisher``, ``kfac``):
    ``tokens`` (calibration cap), ``estimator`` (see :func:`window_objective`) and ``seed``
    (the token signs)."""

    def __init__(
        self,
        tokens: int = 8192,
        progress: bool = True,
        *,
        estimator: str = "token",
        seed: int = 0,
    ):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise BitallocError(CALIBRATION_TOKENS.format(value=tokens))
        self.tokens = tokens
        self.progress = progress
        self.estimator = check_estimator(estimator)
        self.seed = int(seed)

    def estimator_options(self) -> dict[str, Any]:
        """The estimator settings for :meth:`options` (none for ``window``, so that profiles
        cached before the per-token estimator existed keep their key)."""
        return {"estimator": "token", "seed": self.seed} if self.estimator == "token" else {}

    def sign_generator(self) -> torch.Generator | None:
        """A fresh generator of token signs, or None for the ``window`` estimator."""
        return torch.Generator().manual_seed(self.seed) if self.estimator == "token" else None


def spread_windows(n_windows: int, seq_len: int, tokens: int) -> list[int]:
    """Indices of the calibration windows a profiler uses for a ``tokens`` cap: as many whole
    windows as fit (at least one), spread evenly over all ``n_windows``, fixed and
    deterministic."""
    if tokens <= 0:
        raise BitallocError(f"calibration tokens must be positive, got {tokens}")
    if n_windows <= 0:
        raise BitallocError(
            "no calibration windows: the calibration text is shorter than one sequence"
        )
    wanted = max(1, min(n_windows, tokens // seq_len))
    return [(i * n_windows) // wanted for i in range(wanted)]


#: How a window's gradient is formed: ``window`` differentiates the window's mean token loss;
#: ``token`` weights each token's loss by a random sign first (see :func:`window_objective`).
ESTIMATORS = ("window", "token")


def check_estimator(estimator: str) -> str:
    """Validate a gradient-estimator name."""
    if estimator not in ESTIMATORS:
        raise BitallocError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def window_objective(
    model: nn.Module, ids: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The scalar whose gradient a Fisher-type profiler squares, for one (1, seq_len) window.

    Without ``generator``: the mean next-token loss. Squaring its gradient and multiplying by
    the tokens ``T`` estimates the per-token Fisher only when the tokens' gradients are
    uncorrelated; a unit whose output feeds many later positions (attention values) has
    correlated ones and is overestimated. With ``generator``: ``mean_t(s_t * loss_t)`` with
    independent random signs ``s_t``. The cross terms between tokens then vanish in
    expectation, so ``T`` times the squared gradient is an unbiased estimate of the mean
    per-token squared gradient, at the cost of the same one backward pass.
    """
    if generator is None:
        return model(input_ids=ids, labels=ids).loss
    logits = model(input_ids=ids).logits[0, :-1].float()
    per_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    signs = torch.randint(0, 2, (per_token.numel(),), generator=generator) * 2 - 1
    return (per_token * signs.to(per_token)).mean()


@contextlib.contextmanager
def grad_only_for(model: nn.Module, weights: Sequence[nn.Parameter]) -> Iterator[None]:
    """Enable gradients for ``weights`` alone (skips e.g. the 28M-weight embedding gradient),
    restoring every flag afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in saved:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def cached_profile(
    profiler: BaseProfiler,
    model: nn.Module,
    units: Sequence[Unit],
    palette: Sequence[QuantFormat],
    calibration: torch.Tensor,
    *,
    model_fingerprint: str,
    calibration_fingerprint: str,
    use_cache: bool = True,
    importance: Importance | None = None,
) -> Profile:
    """Return the profile from the cache when one matches, else compute and store it.

    The key covers the method and its options, the model's weights, the palette, the
    calibration tokens and the importance that weights the clipping, so a stale profile is
    never reused.
    """
    clipping = clipping_metadata(importance)
    parts = {
        "clipping": clipping,
        "method": profiler.name,
        "options": profiler.options(),
        "model": model_fingerprint,
        "palette": [f.name for f in palette],
        "units": [u.name for u in units],
        "calibration": calibration_fingerprint,
    }
    path = cache_root() / "profiles" / f"{profiler.name}-{cache_key(parts)}.json"
    if use_cache and path.is_file():
        cached = Profile.load(path)
        return Profile(
            cached.units,
            cached.formats,
            cached.loss,
            {**cached.metadata, "cache": "hit", "cache_path": str(path)},
        )
    start = time.perf_counter()
    result = profiler.profile(model, units, palette, calibration, importance)
    metadata = {
        **result.metadata,
        **clipping,
        "model_fingerprint": model_fingerprint,
        "calibration_fingerprint": calibration_fingerprint,
        "palette": [f.name for f in palette],
        "seconds": result.metadata.get("seconds", time.perf_counter() - start),
    }
    result = Profile(result.units, result.formats, result.loss, metadata)
    if use_cache:
        result.save(path)
    return Profile(
        result.units,
        result.formats,
        result.loss,
        {**metadata, "cache": "miss", "cache_path": str(path) if use_cache else None},
    )


def allowed_mask(units: Sequence[Any], palette: Sequence[Any]) -> np.ndarray:
    """(n_units, n_formats) bools: which format can store which unit (a weight format refuses a
    shape its rows do not fit; KV formats, which have no ``allows``, take every unit). A
    profile's entry where it is False is a placeholder (0), never measured and never chosen:
    :func:`bitalloc.planning.build_problem` masks it out."""
    return allowed_by_shapes([getattr(u, "shape", ()) for u in units], palette)


def clipping_metadata(importance: Importance | None) -> dict[str, Any]:
    """What a profile records of the clipping it was made with: ``clipping`` (``weighted`` or
    ``mse``) and, when weighted, ``importance_sha256`` (the importance record's digest)."""
    if importance is None:
        return {"clipping": "mse"}
    return {"clipping": "weighted", "importance_sha256": importance.digest}
