"""11-dimensional unit embeddings for the RL allocator (RAMP).

RAMP (Reinforcement Adaptive Mixed Precision) conditions its policy on a short description of
each layer, built so that a policy trained on one model transfers zero-shot to another. Here each
allocation unit (an ``nn.Linear`` in a decoder block, :class:`bitalloc.models.Unit`) is described
by 11 numbers, named in :data:`EMBEDDING_DIMS` in this order:

====  ===============  ==========================================================================
dim   name             raw value (:func:`unit_statistics`)
====  ===============  ==========================================================================
0     ``act_mean_abs`` mean ``|x|`` of the unit's input activations on the calibration tokens
1     ``act_std``      standard deviation of those activations
2     ``act_max_abs``  max ``|x|`` of those activations
3     ``act_kurtosis`` kurtosis of the activations (all tokens x channels pooled; Pearson
                       ``m4 / m2**2``, 3 for a Gaussian, not the excess)
4     ``w_std``        standard deviation of the weight's entries
5     ``w_kurtosis``   Pearson kurtosis of the weight's entries
6     ``w_outlier``    fraction of weights with ``|w - mean| > 3 std``
7     ``w_row_norm``   mean L2 norm of the weight's rows divided by ``sqrt(in_features)`` (the mean
                       row RMS)
8     ``depth``        ``layer / (n_layers - 1)`` with ``n_layers`` the model's decoder blocks (0
                       for a single layer)
9     ``role``         role code in [0, 1]: q 0, k 1/6, v 2/6, o 3/6, gate 4/6, up 5/6, down 1;
                       any other role 0.5
10    ``size``         ``log(numel) / log(max numel over the model's units)``
====  ===============  ==========================================================================

Standard deviations and kurtoses are population ones (``ddof=0``). A zero-variance sample has no
defined kurtosis; it is reported as 1, the smallest possible value (no tails).

Activation statistics come from forward pre-hooks on each unit's Linear while the model runs on
the calibration windows (batches of ``batch_size`` windows, ``torch.no_grad``, eval mode; hooks
are removed and the previous mode restored afterwards). The hooks accumulate, in float64, the
count, the maximum ``|x|``, ``sum |x|`` and the raw moments ``sum d, d**2, d**3, d**4`` of
``d = x - c``, ``c`` being the mean of the first batch the unit saw (a fixed shift, so the moments
stay raw moments while the cancellation in the kurtosis formula stays small).

Normalization (:func:`normalize_embeddings`), so that units of different models are comparable:

- the scale-dependent dims 0-2, 4 and 7 and the kurtosis dims 3 and 5: natural log (values are
  floored at 1e-30 first, so an all-zero weight gives a very low but finite value), then a z-score
  within the model (over the given units; a dim with zero spread becomes 0);
- dim 6 (a fraction): z-score within the model;
- dims 8-10: kept as they are, in [0, 1];
- finally everything is clipped to [-5, 5] and returned as float32.

The z-scores make the embedding invariant to the overall scale of a model's weights and
activations; only the relative position of a unit within its own model is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bitalloc.calibration import observe_inputs
from bitalloc.errors import BitallocError
from bitalloc.models import Unit, decoder_blocks, discover_units, get_linear

EMBEDDING_DIMS: tuple[str, ...] = (
    "act_mean_abs",
    "act_std",
    "act_max_abs",
    "act_kurtosis",
    "w_std",
    "w_kurtosis",
    "w_outlier",
    "w_row_norm",
    "depth",
    "role",
    "size",
)
N_DIMS = len(EMBEDDING_DIMS)

ROLE_CODES: dict[str, float] = {
    "q": 0.0,
    "k": 1 / 6,
    "v": 2 / 6,
    "o": 3 / 6,
    "gate": 4 / 6,
    "up": 5 / 6,
    "down": 1.0,
    # Fused projections (Phi-3 style) sit where the projections they fuse sit on average.
    "qkv": 1 / 6,
    "gateup": 9 / 12,
}
OTHER_ROLE = 0.5

LOG_DIMS = (0, 1, 2, 3, 4, 5, 7)
ZSCORE_DIMS = (0, 1, 2, 3, 4, 5, 6, 7)
UNIT_INTERVAL_DIMS = (8, 9, 10)
CLIP = 5.0

_LOG_FLOOR = 1e-30
# Below this fraction of the mean square, a variance is rounding noise: the sample is constant.
_DEGENERATE_VARIANCE = 1e-12
# Weights are read in row blocks of about this many entries (bounds float64 copies).
_WEIGHT_CHUNK = 1 << 22


def unit_statistics(
    model: nn.Module,
    units: Sequence[Unit],
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
) -> np.ndarray:
    """Raw (un-normalized) statistics of each unit, ``(len(units), 11)`` float64, rows in the
    order of ``units`` and columns in the order of :data:`EMBEDDING_DIMS`.

    ``windows`` is an ``(n, seq_len)`` integer tensor of token ids (the calibration tokens).
    """
    units = list(units)
    if not units:
        raise BitallocError(
            "no units given: pass the model's units (bitalloc.models.discover_units)"
        )
    strays = [u for u in units if not isinstance(u, Unit)]
    if strays:
        raise BitallocError(
            f"units must be bitalloc.models.Unit objects (from discover_units), got "
            f"{type(strays[0]).__name__}"
        )
    windows = _check_windows(windows)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BitallocError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_token_ids(model, windows)
    names = list(dict.fromkeys(u.name for u in units))
    linears = {name: get_linear(model, name) for name in names}

    acts = _activation_moments(model, linears, windows, batch_size)
    weights = {name: _weight_stats(lin.weight) for name, lin in linears.items()}
    n_layers, max_numel = _model_extent(model, units)

    raw = np.empty((len(units), N_DIMS), dtype=np.float64)
    for i, unit in enumerate(units):
        raw[i, 0:4] = acts[unit.name].summary()
        raw[i, 4:8] = weights[unit.name]
        raw[i, 8] = unit.layer / (n_layers - 1) if n_layers > 1 else 0.0
        raw[i, 9] = ROLE_CODES.get(unit.role, OTHER_ROLE)
        numel = _numel(linears[unit.name])
        raw[i, 10] = math.log(numel) / math.log(max_numel) if max_numel > 1 else 1.0
    return raw


def normalize_embeddings(raw: np.ndarray) -> np.ndarray:
    """Normalize raw statistics of one model's units (see the module docstring).

    Returns ``(n, 11)`` float32 values in [-5, 5].
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] == 0 or raw.shape[1] != N_DIMS:
        raise BitallocError(
            f"raw statistics must be an (n_units, {N_DIMS}) array with n_units >= 1, got shape "
            f"{raw.shape}"
        )
    if not np.all(np.isfinite(raw)):
        raise BitallocError("raw statistics hold NaN or infinite values; recompute them")
    logged = list(LOG_DIMS)
    if np.any(raw[:, logged] < 0):
        dims = [EMBEDDING_DIMS[d] for d in logged if np.any(raw[:, d] < 0)]
        raise BitallocError(f"raw statistics {dims} must be >= 0 (they are magnitudes)")
    interval = list(UNIT_INTERVAL_DIMS)
    if np.any((raw[:, interval] < 0) | (raw[:, interval] > 1)):
        raise BitallocError("raw statistics depth, role and size must lie in [0, 1]")

    out = raw.copy()
    out[:, logged] = np.log(np.maximum(out[:, logged], _LOG_FLOOR))
    for d in ZSCORE_DIMS:
        out[:, d] = _zscore(out[:, d])
    return np.clip(out, -CLIP, CLIP).astype(np.float32)


def unit_embeddings(
    model: nn.Module,
    units: Sequence[Unit],
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
) -> np.ndarray:
    """The units' normalized embeddings, ``(len(units), 11)`` float32 in [-5, 5]."""
    return normalize_embeddings(unit_statistics(model, units, windows, batch_size=batch_size))


def _zscore(col: np.ndarray) -> np.ndarray:
    mean = col.mean()
    std = col.std()
    if not std > 1e-12 * max(1.0, abs(mean)):
        return np.zeros_like(col)
    return (col - mean) / std


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor):
        raise BitallocError(
            f"windows must be an (n, seq_len) tensor of token ids, got {type(windows).__name__}"
        )
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise BitallocError(
            f"windows must be a non-empty (n, seq_len) tensor of token ids, got shape "
            f"{tuple(windows.shape)}"
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise BitallocError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    return windows.long()


def _check_token_ids(model: nn.Module, windows: torch.Tensor) -> None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or (vocab is not None and high >= vocab):
        allowed = f"[0, {vocab})" if vocab is not None else "ids >= 0"
        raise BitallocError(
            f"windows hold token ids in [{low}, {high}], outside the model's vocabulary "
            f"({allowed}); tokenize the text with the model's own tokenizer"
        )


@dataclass
class _Moments:
    """Running float64 sums over every activation entry a unit received."""

    shift: float | None = None
    count: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).reshape(-1)
        if x.numel() == 0:
            return
        if self.shift is None:
            self.shift = float(x.mean())
        d = x - self.shift
        d2 = d * d
        a = x.abs()
        self.count += x.numel()
        self.max_abs = max(self.max_abs, float(a.max()))
        self.sum_abs += float(a.sum())
        self.s1 += float(d.sum())
        self.s2 += float(d2.sum())
        self.s3 += float((d2 * d).sum())
        self.s4 += float((d2 * d2).sum())

    def summary(self) -> tuple[float, float, float, float]:
        """(mean |x|, std, max |x|, Pearson kurtosis)."""
        n = self.count
        m1, m2, m3, m4 = self.s1 / n, self.s2 / n, self.s3 / n, self.s4 / n
        var = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return (
            self.sum_abs / n,
            math.sqrt(max(var, 0.0)),
            self.max_abs,
            _kurtosis(var, central4, m2),
        )


def _degenerate(var: float, mean_square: float) -> bool:
    """Whether a sample's variance is zero up to rounding (a constant sample)."""
    return var <= 0 or var <= _DEGENERATE_VARIANCE * mean_square


def _kurtosis(var: float, central4: float, mean_square: float) -> float:
    if _degenerate(var, mean_square):
        return 1.0
    return max(central4 / (var * var), 1.0)


def _activation_moments(
    model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor, batch_size: int
) -> dict[str, _Moments]:
    moments = {name: _Moments() for name in linears}

    hooks = {name: moments[name].add for name in linears}
    observe_inputs(model, linears, hooks, windows, batch_size)
    missing = [name for name, acc in moments.items() if acc.count == 0]
    if missing:
        raise BitallocError(
            f"unit {missing[0]!r} received no input during the forward pass, so its activations "
            "could not be measured; pass units of Linear layers that the model uses"
        )
    return moments


def _weight_stats(weight: torch.Tensor) -> tuple[float, float, float, float]:
    """(std, Pearson kurtosis, outlier fraction, mean row norm / sqrt(in)) of a 2-D weight, read
    in float64 row blocks (three passes: mean, central moments, outliers)."""
    w = weight.detach()
    if w.ndim != 2 or w.numel() == 0:
        raise BitallocError(f"unit weights must be non-empty 2-D matrices, got {tuple(w.shape)}")
    rows, cols = w.shape
    step = max(1, _WEIGHT_CHUNK // cols)
    blocks = [(s, min(rows, s + step)) for s in range(0, rows, step)]
    n = w.numel()

    total = 0.0
    square = 0.0
    row_norms = 0.0
    for a, b in blocks:
        x = w[a:b].to(torch.float64)
        total += float(x.sum())
        square += float((x * x).sum())
        row_norms += float(torch.linalg.vector_norm(x, dim=1).sum())
    mean = total / n

    m2 = 0.0
    m4 = 0.0
    for a, b in blocks:
        d = w[a:b].to(torch.float64) - mean
        d2 = d * d
        m2 += float(d2.sum())
        m4 += float((d2 * d2).sum())
    var = m2 / n
    std = math.sqrt(var)
    kurt = _kurtosis(var, m4 / n, square / n)

    outliers = 0
    if not _degenerate(var, square / n):
        for a, b in blocks:
            d = (w[a:b].to(torch.float64) - mean).abs()
            outliers += int((d > 3 * std).sum())
    return std, kurt, outliers / n, row_norms / rows / math.sqrt(cols)


def _model_extent(model: nn.Module, units: Sequence[Unit]) -> tuple[int, int]:
    """(number of decoder blocks, largest unit numel) of the model, counting the given units."""
    try:
        _, blocks = decoder_blocks(model)
        n_layers = len(blocks)
        model_units = discover_units(model)
    except BitallocError:
        n_layers, model_units = 0, []
    n_layers = max([n_layers] + [u.layer + 1 for u in units])
    max_numel = max(_numel(get_linear(model, u.name)) for u in units)
    if model_units:
        max_numel = max(max_numel, max(u.numel for u in model_units))
    return n_layers, max_numel


def _numel(linear: nn.Linear) -> int:
    return int(linear.weight.numel())
