"""Prefix replay for KV sensitivity: when only layer ``i``'s cache is quantized, every decoder
block before ``i`` computes exactly what it computed in the unquantized forward, so the
measuring forwards replay those blocks' recorded outputs (and cached keys and values) instead of
recomputing them. Exact, and on average about half the block computation of a KV profile.

Memory: one recorded output per block for the current calibration batch
(``blocks x batch x seq x hidden`` floats), plus the keys and values handed to each
sliding-window layer (its cache keeps only the window, the replay needs every token), released
with the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from bitalloc.kv.formats import attention_geometry
from bitalloc.models import decoder_blocks


def _recording_update(update, states: dict, layer: int):
    """``update`` that first records the key and value states it is handed."""

    def record(key_states, value_states, *args, **kwargs):
        states[layer] = (key_states, value_states)
        return update(key_states, value_states, *args, **kwargs)

    return record


class _ReplayedBlock(nn.Module):
    """Stands in for a decoder block: returns its recorded output and puts its recorded keys and
    values in the cache it is handed (the cache must hold every layer's states)."""

    def __init__(self, output: Any, layer: int | None, keys, values) -> None:
        super().__init__()
        self.output = output
        self.layer = layer
        self.keys = keys
        self.values = values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The recorded output; the recorded states go into the cache passed by keyword."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer is not None:
            cache.layers[self.layer].update(self.keys, self.values)
        return self.output


class PrefixReplay:
    """Records the decoder blocks' outputs in a reference forward (:meth:`recording`), then lets
    forwards replay the blocks before a given attention layer (:meth:`replaying`)."""

    def __init__(self, model: nn.Module) -> None:
        prefix, self.blocks = decoder_blocks(model)
        geometry = attention_geometry(model)
        self._layer_of_block: dict[int, int] = {}
        for path, layer in zip(geometry.paths, geometry.layer_indices):
            position = int(path[len(prefix) + 1 :].split(".")[0])
            self._layer_of_block[position] = layer
        self._block_of_layer = {layer: pos for pos, layer in self._layer_of_block.items()}
        self._outputs: dict[int, Any] = {}
        self._states: dict[int, tuple[Any, Any]] = {}
        self._reference = None

    @contextmanager
    def recording(self, reference_cache) -> Iterator[None]:
        """Record every block's output during the forward run inside the block; the forward
        must use ``reference_cache`` (unquantized), whose states the replay hands on."""
        outputs: dict[int, Any] = {}
        hooks = [
            block.register_forward_hook(
                lambda module, args, output, position=position: outputs.__setitem__(
                    position, output
                )
            )
            for position, block in enumerate(self.blocks)
        ]
        # A sliding-window layer keeps only its window after the forward, so the states it was
        # handed are recorded on the way in (a full layer's cache holds them all already).
        states: dict[int, tuple[Any, Any]] = {}
        wrapped = [
            layer
            for layer in self._layer_of_block.values()
            if getattr(reference_cache.layers[layer], "is_sliding", False)
        ]
        for layer in wrapped:
            cache_layer = reference_cache.layers[layer]
            cache_layer.update = _recording_update(cache_layer.update, states, layer)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for layer in wrapped:
                del reference_cache.layers[layer].update  # the class's method again
        self._outputs, self._reference, self._states = outputs, reference_cache, states

    @contextmanager
    def replaying(self, layer: int) -> Iterator[None]:
        """Within the block, the decoder blocks before attention layer ``layer`` are replayed
        from the last :meth:`recording`; the model is restored on exit."""
        stop = self._block_of_layer[layer]
        originals = [self.blocks[p] for p in range(stop)]
        try:
            for position in range(stop):
                attention = self._layer_of_block.get(position)
                keys = values = None
                if attention in self._states:
                    keys, values = self._states[attention]
                elif attention is not None:
                    states = self._reference.layers[attention]
                    keys, values = states.keys, states.values
                self.blocks[position] = _ReplayedBlock(
                    self._outputs[position], attention, keys, values
                )
            yield
        finally:
            for position, block in enumerate(originals):
                self.blocks[position] = block

    def release(self) -> None:
        """Drop the recorded outputs (free their memory)."""
        self._outputs, self._states, self._reference = {}, {}, None
