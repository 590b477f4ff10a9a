"""Applying formats that quantize with the calibration inputs' Gram matrices (``+gptq``).

Such a unit's codes depend on ``H = XᵀX / n`` of its inputs, so applying an allocation needs the
calibration windows again (the matrices are not recorded: megabytes per unit). Two ways:

- **one pass** (:func:`gram_importance`): every unit's ``H`` from the unquantized model, as
  the profile and the measurement used; the result is the model that was measured;
- **sequential** (:func:`apply_sequential_`): decoder blocks in model order, each block's
  inputs taken from the blocks before it *already quantized*, as GPTQ's reference does across
  layers, so that later blocks correct for the error of earlier ones. Units of one block share
  the block's input (the block itself is quantized after its matrices are gathered). Only the
  block inputs are kept between blocks (tokens x width floats), never the whole model twice.

Both keep every other unit's importance as recorded (its vector), so units without ``+gptq``
are quantized exactly as measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, parse_format
from bitalloc.importance import (
    IMPORTANCE_TOKENS,
    Importance,
    ImportanceAccumulator,
    gather_importance,
)
from bitalloc.models import Unit, decoder_blocks, discover_units, get_linear
from bitalloc.sensitivity.base import spread_windows

#: Windows per forward while gathering (as the importance pass).
BATCH = 4


def gram_units(assignment: Mapping[str, str | Format]) -> list[str]:
    """The units whose format quantizes with a Gram matrix."""
    return [n for n, f in assignment.items() if parse_format(f).uses_gram]


def merged(recorded: Importance | None, gathered: Importance) -> Importance:
    """``gathered``'s Gram matrices with ``recorded``'s vectors where it has them (their
    diagonals set to those vectors, so that diagonal-only formats quantize as measured)."""
    if recorded is None:
        return gathered
    values = dict(recorded.values)
    grams: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, gram in (gathered.grams or {}).items():
        vector = recorded.vector(name)
        if vector is None:
            values[name] = gathered.values[name]
            grams[name] = gram
            continue
        key = id(gram)
        if key not in seen:
            seen[key] = gram.clone()
            torch.diagonal(seen[key]).copy_(vector)
        grams[name] = seen[key]
    return Importance(values, recorded.tokens, grams)


def gram_importance(
    model: nn.Module,
    assignment: Mapping[str, str | Format],
    calibration: torch.Tensor,
    recorded: Importance | None,
    *,
    tokens: int = IMPORTANCE_TOKENS,
    progress: bool = True,
) -> Importance:
    """``recorded`` with the Gram matrices of the ``+gptq`` units gathered from the unquantized
    ``model`` over the same evenly spread calibration windows as the importance."""
    names = set(gram_units(assignment))
    units = [u for u in discover_units(model) if u.name in names]
    missing = names - {u.name for u in units}
    if missing:
        raise BitallocError(
            f"{sorted(missing)[0]} is not a unit of this model's decoder blocks; the allocation "
            "was made for another model"
        )
    gathered = gather_importance(
        model, units, calibration, tokens=tokens, progress=progress, grams=True
    )
    return merged(recorded, gathered)


class _Stop(Exception):
    """Raised by the hook that catches the first block's inputs, to skip the rest."""


def apply_sequential_(
    model: nn.Module,
    assignment: Mapping[str, str | Format],
    calibration: torch.Tensor,
    recorded: Importance | None,
    *,
    tokens: int = IMPORTANCE_TOKENS,
    progress: bool = True,
) -> nn.Module:
    """Fake-quantize ``model`` in place, block by block, each ``+gptq`` unit with the Gram
    matrix of its inputs in the model whose earlier blocks are already quantized (see the
    module docstring); other units with their recorded importance. Returns ``model``."""
    resolved = {name: parse_format(f) for name, f in assignment.items()}
    for name in resolved:
        get_linear(model, name)
    prefix, blocks = decoder_blocks(model)
    by_block: list[list[str]] = [[] for _ in blocks]
    outside = []
    for name in resolved:
        index = _block_of(name, prefix, len(blocks))
        (outside if index is None else by_block[index]).append(name)
    late = [n for n in outside if resolved[n].uses_gram]
    if late:
        raise BitallocError(
            f"{late[0]} is outside the decoder blocks, so it has no place in a sequential pass; "
            "apply without sequential"
        )
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise BitallocError("the sequential pass needs calibration windows (n, seq_len)")
    picks = spread_windows(len(calibration), int(calibration.shape[1]), tokens)
    windows = calibration[picks]
    units = {u.name: u for u in discover_units(model)}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            inputs = first_block_inputs(
                blocks[0], lambda ids: model(input_ids=ids, use_cache=False), windows
            )
            for index, block in enumerate(
                tqdm(blocks, desc="sequential", unit="block", disable=not progress)
            ):
                names = by_block[index]
                _quantize_block(model, block, names, resolved, inputs, recorded, units)
                if index + 1 < len(blocks):
                    inputs = [run_block(block, args, kwargs) for args, kwargs in inputs]
        with torch.no_grad():
            for name in outside:
                linear = get_linear(model, name)
                vector = None if recorded is None else recorded.vector(name)
                linear.weight.copy_(resolved[name].fake_quantize(linear.weight, vector))
    finally:
        model.train(was_training)
    return model


def _block_of(name: str, prefix: str, count: int) -> int | None:
    head = f"{prefix}." if prefix else ""
    if not name.startswith(head):
        return None
    part = name[len(head) :].split(".", 1)[0]
    return int(part) if part.isdigit() and int(part) < count else None


def first_block_inputs(
    block: nn.Module, forward: Callable[[torch.Tensor], object], windows: torch.Tensor
) -> list[tuple[tuple, dict[str, Any]]]:
    """(args, kwargs) of ``block``'s call for each batch of :data:`BATCH` windows, caught by a
    hook that stops ``forward(ids)`` (the model's own forward on one batch) at that block."""
    caught: list[tuple[tuple, dict[str, Any]]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        caught.append((args, dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(windows), BATCH):
            with contextlib.suppress(_Stop):
                forward(windows[start : start + BATCH])
    finally:
        handle.remove()
    if len(caught) * BATCH < len(windows):
        raise BitallocError("the model never called its first decoder block; cannot run it")
    return caught


def run_block(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """The block's output as the next block's (args, kwargs)."""
    return with_hidden(args, kwargs, block_output(block, args, kwargs))


def block_output(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states ``block`` returns for one call."""
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def with_hidden(args: tuple, kwargs: dict[str, Any], hidden: Any) -> tuple[tuple, dict]:
    """A block call's (args, kwargs) with its hidden states replaced by ``hidden``."""
    if args:
        return (hidden, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": hidden}


def _quantize_block(
    model: nn.Module,
    block: nn.Module,
    names: Sequence[str],
    resolved: Mapping[str, Format],
    inputs: Sequence[tuple[tuple, dict[str, Any]]],
    recorded: Importance | None,
    units: Mapping[str, Unit],
) -> None:
    """Gather the block's Gram matrices from ``inputs`` (unquantized block), then quantize its
    units: ``+gptq`` ones with those matrices, others with their recorded vector."""
    gram_names = [n for n in names if resolved[n].uses_gram]
    importance = recorded
    if gram_names:
        acc = ImportanceAccumulator(model, [units[n] for n in gram_names], grams=True)
        for args, kwargs in inputs:
            acc.add_batch_through(lambda a=args, k=kwargs: block(*a, **k))
        importance = acc.result()
        if recorded is not None:
            importance = Importance(
                {**recorded.values, **importance.values}, recorded.tokens, importance.grams
            )
    with torch.no_grad():
        for name in names:
            linear = get_linear(model, name)
            given = None if importance is None else importance.of(name)
            if not resolved[name].uses_gram and recorded is not None:
                given = recorded.vector(name)
            linear.weight.copy_(resolved[name].fake_quantize(linear.weight, given))
