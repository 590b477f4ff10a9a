"""Stage 1, prepare: load the model, discover its units, resolve the palette and the text,
and (when asked) scale-fold the model before anything is profiled."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitalloc.apply import QuantizedWeightCache
from bitalloc.data import TextSplits, load_text, text_prefix, tokenize, windows
from bitalloc.errors import BitallocError
from bitalloc.folding_record import ScaleFolding, fold_loaded
from bitalloc.formats import Format, QuantFormat, parse_palette
from bitalloc.importance import CLIPPING_METHODS, Importance, gather_importance
from bitalloc.models import LoadedModel, Unit, discover_units, load_model
from bitalloc.planning import check_budget
from bitalloc.targets import (
    check_target_palette,
    file_overhead,
    outside_tensors,
    source_unit_types,
    target_palette,
    unit_byte_budget,
)

if TYPE_CHECKING:
    from bitalloc.allocation import Allocation
    from bitalloc.config import AllocateConfig


@dataclass(frozen=True)
class Prepared:
    """A loaded model with its units, palette and tokenized text, ready to profile and measure."""

    loaded: LoadedModel
    units: list[Unit]
    palette: tuple[QuantFormat, ...]
    text: TextSplits
    seq_len: int
    #: Set when the model was scale-folded before profiling (see :func:`prepare_for`).
    scale_folding: ScaleFolding | None = None
    #: Per-input-column importance of each unit, which weights every clipping search (None:
    #: plain squared error, ``--clipping mse``); see :mod:`bitalloc.importance`.
    importance: Importance | None = field(default=None, compare=False)
    #: The engine the allocation is for (see :mod:`bitalloc.targets`).
    target: str = "bitalloc"
    #: Bytes a file-size budget leaves for the units (None: no file-size budget).
    file_unit_bytes: float | None = None
    #: The units' quantized weights, kept across the measurements of this model.
    quantized: QuantizedWeightCache = field(
        default_factory=QuantizedWeightCache, compare=False, repr=False
    )

    @property
    def model(self) -> nn.Module:
        """The model being allocated."""
        return self.loaded.model

    def recorded(self, allocation: Allocation) -> Allocation:
        """``allocation`` carrying what this preparation did to the weights it measured: the
        scale-folding record and the importance that weighted the clipping, so that applying
        it reproduces them."""
        if self.scale_folding is not None:
            allocation = allocation.with_scale_folding(self.scale_folding)
        if self.target != "bitalloc":
            allocation = allocation.with_target(
                self.target,
                outside_tensors(self.model, self.units, self.target),
                source_unit_types(self.loaded.source, self.model, self.units),
            )
        return allocation.with_importance(self.importance)

    def calibration_windows(self) -> torch.Tensor:
        """All calibration windows (profilers pick their own subset), each starting with the
        tokenizer's start tokens (:func:`bitalloc.data.text_prefix`)."""
        return windows(self._calibration_ids, self.seq_len, prefix=self._text_prefix)

    def evaluation_windows(self, tokens: int | None) -> torch.Tensor:
        """Evaluation windows, evenly spread, capped at ``tokens``, each starting with the
        tokenizer's start tokens."""
        return windows(self._evaluation_ids, self.seq_len, tokens, prefix=self._text_prefix)

    # The tokenized splits and the prefix are cached on the instance: the windows are asked for
    # several times per run and tokenizing a split takes far longer than cutting it. Prepared is
    # frozen but has no __slots__, so cached_property stores into the instance's __dict__ (no
    # shared state), and dataclasses.replace builds a new instance that tokenizes afresh.
    @cached_property
    def _text_prefix(self) -> tuple[int, ...]:
        return text_prefix(self.loaded.tokenizer)

    @cached_property
    def _calibration_ids(self) -> torch.Tensor:
        return tokenize(self.loaded.tokenizer, self.text.calibration)

    @cached_property
    def _evaluation_ids(self) -> torch.Tensor:
        return tokenize(self.loaded.tokenizer, self.text.evaluation)


def prepare(
    model: nn.Module | str | Path | None = None,
    *,
    formats: Sequence[str | QuantFormat] | str | None = None,
    calibration: str | Path | Sequence[str | Path] | None = None,
    evaluation: str | Path | Sequence[str | Path] | None = None,
    tokenizer: object | None = None,
    seq_len: int | None = None,
    clipping: str = "weighted",
    progress: bool = True,
    use_cache: bool = True,
    importance: Importance | None = None,
) -> Prepared:
    """Load the model, discover its units and resolve the palette and text (``seq_len`` None:
    the configured default, :attr:`bitalloc.config.DataConfig.seq_len`).

    ``clipping="weighted"`` gathers each unit's importance from the calibration windows (one
    forward pass over up to :data:`~bitalloc.importance.IMPORTANCE_TOKENS` tokens), which then
    weights every clipping search (cached on disk like profiles unless ``use_cache`` is
    False); ``"mse"`` minimises each group's plain squared error. A given ``importance`` (an
    allocation's record, to measure it again) is used instead of gathering one.
    """
    from bitalloc.config import DataConfig

    check_clipping(clipping)
    palette = parse_palette(formats)
    text = load_text(calibration, evaluation)
    loaded = load_model(model, tokenizer)
    units = discover_units(loaded.model)
    prep = Prepared(
        loaded, units, palette, text, DataConfig().seq_len if seq_len is None else seq_len
    )
    if importance is not None:
        return dataclasses.replace(prep, importance=importance)
    return with_importance(prep, clipping, progress=progress, use_cache=use_cache)


def needs_grams(palette: Sequence[Format]) -> list[str]:
    """Names of the palette's formats that quantize with input Gram matrices (``+gptq``)."""
    return [f.name for f in palette if getattr(f, "uses_gram", False)]


def check_clipping(clipping: str) -> str:
    """``clipping`` if it names a clipping objective, else :class:`BitallocError`."""
    if clipping not in CLIPPING_METHODS:
        raise BitallocError(
            f"clipping {clipping!r} is not one of {', '.join(CLIPPING_METHODS)}: weighted "
            "(by each input column's mean squared activation) or mse (plain squared error)"
        )
    return clipping


def with_importance(
    prep: Prepared, clipping: str, *, progress: bool = True, use_cache: bool = False
) -> Prepared:
    """``prep`` with the importance that ``clipping`` asks for, gathered from its calibration
    windows (``weighted``; read from the cache when ``use_cache`` and one matches) or none
    (``mse``), and a fresh cache of quantized weights."""
    importance = None
    grams = needs_grams(prep.palette)
    if check_clipping(clipping) == "weighted":
        importance = gather_importance(
            prep.model,
            prep.units,
            prep.calibration_windows(),
            progress=progress,
            use_cache=use_cache,
            grams=bool(grams),
        )
    elif grams:
        raise BitallocError(
            f"{grams[0]} quantizes with the calibration inputs' Gram matrices, which "
            "--clipping mse turns off; use --clipping weighted or drop the +gptq formats"
        )
    new = dataclasses.replace(prep, importance=importance, quantized=QuantizedWeightCache())
    _keep_tokenized(prep, new)
    return new


def _keep_tokenized(old: Prepared, new: Prepared) -> None:
    # Same tokenizer and text: the tokenized splits cached on ``old`` hold for ``new`` too.
    if new.loaded.tokenizer is old.loaded.tokenizer and new.text == old.text:
        for name in ("_text_prefix", "_calibration_ids", "_evaluation_ids"):
            if name in old.__dict__:
                new.__dict__[name] = old.__dict__[name]


def prepare_for(
    model: nn.Module | str | Path | None,
    config: AllocateConfig,
    *,
    tokenizer: object | None = None,
    formats: Sequence[str | QuantFormat] | None = None,
    check: Callable[[Prepared], object] | None = None,
) -> Prepared:
    """:func:`prepare` as ``config`` asks: the weights' budget is checked against the units and
    palette, ``check`` (a caller's own check, e.g. that a KV budget fits) runs next, and the
    model is scale-folded last, so that nothing expensive runs before every check passed.

    ``formats`` overrides ``config.target.formats`` (a saved profile's columns are the palette
    when the config names none). An ``nn.Module`` passed in is copied before folding.
    """
    data, target = config.data, config.target
    if formats is None:
        formats = target.formats if target.formats is not None else target_palette(target.target)
    prep = prepare(
        config.model if model is None else model,
        formats=formats,
        calibration=None if data.calibration is None else list(data.calibration),
        evaluation=None if data.evaluation is None else list(data.evaluation),
        tokenizer=tokenizer,
        seq_len=data.seq_len,
        clipping="mse",  # gathered below, once the model is in its final (folded) form
    )
    check_target_palette(target.target, [f.name for f in prep.palette])
    prep = dataclasses.replace(prep, target=target.target)
    if target.avg_bits is not None:
        check_budget(target.avg_bits, prep.units, prep.palette)
    if target.max_file_bytes is not None:
        overhead = file_overhead(
            prep.model, prep.units, target.target, prep.loaded.source, prep.loaded.tokenizer
        )
        unit_bytes = unit_byte_budget(target.max_file_bytes, overhead, prep.units, prep.palette)
        prep = dataclasses.replace(prep, file_unit_bytes=unit_bytes)
    if check is not None:
        check(prep)
    alpha = config.profile.scale_folding
    if alpha is not None:
        # load_model does not copy a module passed in, so a copy of it is folded.
        loaded, record = fold_loaded(
            prep.loaded,
            prep.calibration_windows(),
            alpha,
            copy_module=isinstance(model, nn.Module),
        )
        prep = dataclasses.replace(prep, loaded=loaded, scale_folding=record)
    if target.imatrix is not None:
        from bitalloc.imatrix import load_imatrix

        grams = needs_grams(prep.palette)
        if grams:
            raise BitallocError(
                f"{grams[0]} quantizes with the calibration inputs' Gram matrices, which an "
                "importance matrix file does not hold; drop --imatrix or the +gptq formats"
            )
        importance = load_imatrix(target.imatrix, prep.model, prep.units)
        new = dataclasses.replace(prep, importance=importance, quantized=QuantizedWeightCache())
        _keep_tokenized(prep, new)
        return new
    return with_importance(
        prep,
        config.target.clipping,
        progress=config.progress,
        use_cache=config.profile.use_cache,
    )


def select_units(units: Sequence[Unit], pattern: str | None) -> list[Unit]:
    r"""The units whose name matches the regular expression ``pattern`` (searched, so
    ``layers\.(0|1)\.`` or ``mlp`` work); all units when it is None."""
    if pattern is None:
        return list(units)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise BitallocError(
            f"units filter {pattern!r} is not a valid regular expression ({exc})"
        ) from None
    chosen = [u for u in units if regex.search(u.name)]
    if not chosen:
        raise BitallocError(
            f"units filter {pattern!r} matches none of the {len(units)} units (e.g. "
            f"{units[0].name!r}); fix the pattern"
        )
    return chosen
