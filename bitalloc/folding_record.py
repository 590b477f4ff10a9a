"""A record of Scale Folding that travels with an allocation, so that applying it reproduces it.

An allocation made on a scale-folded model (:mod:`bitalloc.folding`) chose formats for the
folded weights; quantizing the original weights with it would be wrong. :class:`ScaleFolding`
therefore stores the exact scales that were folded (float16, little-endian, base64 per fold
key), their SHA-256 and what the fold measured, and :func:`apply_recorded_` folds them into
another copy of the original model, bit for bit the same weights as the allocation saw.

A folded model carries the record's digest in the attribute :data:`FOLDED_ATTR` of its root
module, so it is never folded twice; a model folded for another record is refused. The mark
lives on the Python object only: a folded model saved and loaded again has lost it, so apply
allocations to the original model.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from bitalloc.config.messages import DEFAULT_ALPHA
from bitalloc.errors import BitallocError
from bitalloc.fileio import decode_two_byte_values
from bitalloc.folding import DEFAULT_PAIRS, apply_fold_scales_, check_alpha, fold_with_scales_
from bitalloc.models import LoadedModel

#: Calibration tokens :func:`bitalloc.allocate` folds with (the first windows of calibration).
FOLD_TOKENS = 4096
#: Attribute of a folded model's root module holding the record's ``scales_sha256``.
FOLDED_ATTR = "bitalloc_scale_folding"

#: Appended to the fingerprint mismatch of a saved profile when the model was folded.
FOLDED_PROFILE_HINT = (
    "; scale folding changed the weights, so a profile of the unfolded model does not apply: "
    "drop the saved profile (to profile the folded model) or scale folding"
)


class ScaleFolding(BaseModel):
    """What scale folding did before the allocation was made, with the scales themselves.

    ``scales`` maps a fold key (``"3.norm-qkv"``) to the base64 of its scale vector's
    little-endian float16 bytes; ``scales_sha256`` is the hex SHA-256 of that mapping (see
    :func:`scales_digest`). Outlier ratios are None where undefined (median channel max zero).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float
    pairs: list[str]
    tokens: int
    layers: int
    outlier_ratio_before: float | None
    outlier_ratio_after: float | None
    seconds: float
    scales_sha256: str
    scales: dict[str, str]

    def decoded(self) -> dict[str, torch.Tensor]:
        """The scale vectors (float32), checked against ``scales_sha256``."""
        return decode_scales(self.scales, self.scales_sha256)

    def check(self) -> None:
        """Raise :class:`BitallocError` unless alpha, pairs and scales are consistent."""
        check_alpha(self.alpha)
        unknown = [p for p in self.pairs if p not in DEFAULT_PAIRS]
        if unknown or not self.pairs:
            raise BitallocError(
                f"scale folding pairs {self.pairs} are not a non-empty subset of {DEFAULT_PAIRS}; "
                "the file was edited inconsistently"
            )
        for key in self.decoded():
            if key.partition(".")[2] not in self.pairs:
                raise BitallocError(
                    f"scale folding holds scales {key!r} for a pair not in {self.pairs}; the file "
                    "was edited inconsistently"
                )


# ---------------------------------------------------------------- encoding


def encode_scales(scales: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Fold key -> base64 of the vector's little-endian float16 bytes, keys sorted.

    Values must be exactly representable in float16 (as :func:`~bitalloc.folding.fold_scales`
    returns them), finite and positive, so the record holds precisely the applied scales.
    """
    if not scales:
        raise BitallocError("no scales to encode; pass what fold_scales returned")
    out = {}
    for key in sorted(scales):
        value = scales[key]
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 0:
            raise BitallocError(f"scales {key!r} must be a non-empty 1-D tensor")
        s = value.detach().cpu().to(torch.float32)
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise BitallocError(f"scales {key!r} must be finite and positive")
        half = s.to(torch.float16)
        if not torch.equal(half.to(torch.float32), s):
            raise BitallocError(
                f"scales {key!r} are not exactly representable in float16, so a record would "
                "not reproduce them; round them with .half() before folding"
            )
        raw = half.numpy().astype("<f2").tobytes()
        out[key] = base64.b64encode(raw).decode("ascii")
    return out


def scales_digest(encoded: Mapping[str, str]) -> str:
    """Hex SHA-256 of encoded scales (their JSON with sorted keys and no spaces)."""
    text = json.dumps(dict(encoded), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decode_scales(encoded: Mapping[str, str], sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_scales` (float32 vectors), checked against ``sha256`` if given."""
    if not encoded:
        raise BitallocError("the scale folding record holds no scales")
    if sha256 is not None and scales_digest(encoded) != sha256:
        raise BitallocError(
            "the scale folding scales do not match their scales_sha256; the record was edited "
            "or damaged, so make the allocation again"
        )
    out = {}
    for key, text in encoded.items():
        raw = decode_two_byte_values(text, f"scale folding scales {key!r}", "float16")
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        out[key] = torch.from_numpy(values)
    return out


# ---------------------------------------------------------------- folding


def fold_model_(
    model: nn.Module,
    windows: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    pairs: Sequence[str] | str = DEFAULT_PAIRS,
) -> ScaleFolding:
    """Scale-fold ``model`` in place on ``windows`` and return the record; the model is marked
    folded by it. A model already marked folded is refused (folding twice would change it
    again, and its allocation would no longer apply to the original)."""
    marked = getattr(model, FOLDED_ATTR, None)
    if marked is not None:
        raise BitallocError(
            f"this model is already scale-folded (scales sha256 {marked[:12]}...); fold the "
            "original model"
        )
    report, scales = fold_with_scales_(model, windows, alpha=alpha, pairs=pairs)
    encoded = encode_scales(scales)
    record = ScaleFolding(
        alpha=report.alpha,
        pairs=list(report.pairs),
        tokens=report.tokens,
        layers=report.layers,
        outlier_ratio_before=_finite(report.outlier_ratio_before),
        outlier_ratio_after=_finite(report.outlier_ratio_after),
        seconds=report.seconds,
        scales_sha256=scales_digest(encoded),
        scales=encoded,
    )
    setattr(model, FOLDED_ATTR, record.scales_sha256)
    return record


def fold_loaded(
    loaded: LoadedModel, windows: torch.Tensor, alpha: float, *, copy_module: bool
) -> tuple[LoadedModel, ScaleFolding]:
    """Fold a loaded model on the first :data:`FOLD_TOKENS` tokens of ``windows`` (whole
    windows, at least one). With ``copy_module`` (a module the caller passed in, which loading
    does not copy) a deep copy is folded, so the caller's model is left as it was."""
    seq_len = int(windows.shape[-1]) if windows.dim() == 2 else 0
    first = windows[: max(1, FOLD_TOKENS // seq_len)] if seq_len else windows
    model = copy.deepcopy(loaded.model) if copy_module else loaded.model
    record = fold_model_(model, first, alpha)
    return LoadedModel(model, loaded.tokenizer, loaded.source), record


def is_folded(model: nn.Module, record: ScaleFolding) -> bool:
    """Whether ``model`` is marked folded by ``record``; a model marked folded by another
    record raises, since neither folding it again nor quantizing it as it is would be right."""
    marked = getattr(model, FOLDED_ATTR, None)
    if marked is None:
        return False
    if marked != record.scales_sha256:
        raise BitallocError(
            f"this model was scale-folded for another allocation (scales sha256 {marked[:12]}..., "
            f"this allocation records {record.scales_sha256[:12]}...); apply the allocation to "
            "the original, unfolded model"
        )
    return True


def require_folded(model: nn.Module, record: ScaleFolding | None) -> None:
    """Raise unless ``model`` is folded by ``record`` (nothing to check when it is None): an
    allocation made on a folded model must be measured on the folded weights."""
    if record is not None and not is_folded(model, record):
        raise BitallocError(
            "the allocation was made on a scale-folded model; fold this one first with "
            "bitalloc.folding_record.apply_recorded_(model, allocation.data.scale_folding)"
        )


def apply_recorded_(model: nn.Module, record: ScaleFolding) -> bool:
    """Fold ``record``'s scales into ``model`` in place unless it is already folded by it;
    returns whether it folded now. Everything is checked before a weight changes."""
    if is_folded(model, record):
        return False
    apply_fold_scales_(model, record.decoded())
    setattr(model, FOLDED_ATTR, record.scales_sha256)
    return True


def describe(record: ScaleFolding) -> str:
    """One line for the CLI: alpha, tokens, layers, seconds and the outlier ratio change."""

    def ratio(x: float | None) -> str:
        return "undefined" if x is None else f"{x:.2f}"

    return (
        f"scale folding (alpha {record.alpha:g}, {len(record.pairs)} pairs, {record.layers} "
        f"layers, {record.tokens} tokens, {record.seconds:.1f} s): outlier ratio "
        f"{ratio(record.outlier_ratio_before)} -> {ratio(record.outlier_ratio_after)}"
    )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
