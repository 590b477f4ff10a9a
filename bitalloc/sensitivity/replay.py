"""Scoring a model whose weights changed from one decoder layer on, without recomputing the
layers before it.

Measured sensitivity quantizes one unit at a time; everything before that unit's layer is
unchanged, so its output is computed once. :class:`LayerReplay` runs the unquantized model once
over the calibration windows, keeps the input of every decoder block (and the keyword arguments
the model passes to its blocks: attention mask, rotary embeddings), and later reruns only
blocks ``l..L-1``, the final norm and the output head. On SmolLM2-135M this skips on average
half of the blocks per measurement.

Replay assumes a Llama-style tail (``norm`` beside the block list, then the output
embeddings). That is checked once against a full forward pass; a model whose tail differs
(logit soft-capping, extra modules) is scored by full forward passes instead, with the same
results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.models import decoder_blocks

# Replayed logits must match the full forward to this relative tolerance to be trusted.
_REPLAY_RTOL = 1e-4


@dataclass(frozen=True)
class Score:
    """Mean next-token loss (nats) and, when reference log-probabilities are kept, mean KL
    divergence from the unquantized model's next-token distribution (nats)."""

    loss: float
    kl: float | None


class _Capture:
    """Pre-hooks that record each block's hidden-state input and the call's keyword
    arguments."""

    def __init__(self, blocks: nn.ModuleList):
        self.inputs: list[torch.Tensor | None] = [None] * len(blocks)
        self.kwargs: dict[str, Any] | None = None
        self.handles = [
            block.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, block in enumerate(blocks)
        ]

    def _hook(self, index: int):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[index] = hidden.detach()
            if index == 0:
                self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class LayerReplay:
    """Scores of the model on fixed windows, recomputed from a given decoder layer.

    Build it on the unquantized model; then change weights (e.g. inside
    :func:`bitalloc.apply.fake_quantized`) and call :meth:`score` with the first layer whose
    weights changed. ``keep_logprobs`` keeps the unquantized next-token log-probabilities
    (tokens x vocabulary floats) so that :meth:`score` also returns the KL divergence.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, *, keep_logprobs: bool = False):
        if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            raise BitallocError(
                "windows must be (n >= 1, seq_len >= 2) token ids, got shape "
                f"{tuple(windows.shape)}"
            )
        self.model = model
        self.windows = windows
        prefix, self.blocks = decoder_blocks(model)
        parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
        self._norm = getattr(parent, "norm", None)
        self._head = model.get_output_embeddings()
        self._inputs: list[list[torch.Tensor]] = []
        self._kwargs: list[dict[str, Any]] = []
        self._ref_logprobs: list[torch.Tensor] | None = [] if keep_logprobs else None
        losses = []
        with torch.inference_mode():
            for ids in windows:
                capture = _Capture(self.blocks)
                try:
                    logits = model(input_ids=ids[None], use_cache=False).logits
                finally:
                    capture.remove()
                if any(x is None for x in capture.inputs) or capture.kwargs is None:
                    raise BitallocError(
                        f"{type(model).__name__} did not call every decoder block in its forward "
                        "pass; measured profiling needs a standard decoder-only model"
                    )
                self._inputs.append(list(capture.inputs))
                self._kwargs.append(capture.kwargs)
                losses.append(self._nll(logits, ids))
                if self._ref_logprobs is not None:
                    self._ref_logprobs.append(F.log_softmax(logits[0, :-1].float(), dim=-1))
            self.base_loss = sum(losses) / self.tokens
            self.replays = self._check_replay(logits, len(windows) - 1)

    @property
    def keeps_logprobs(self) -> bool:
        """Whether :meth:`score` also returns the KL divergence."""
        return self._ref_logprobs is not None

    @property
    def tokens(self) -> int:
        """Predicted tokens per score (every window position but the first)."""
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @staticmethod
    def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="sum"))

    def _tail_logits(self, index: int, start: int) -> torch.Tensor:
        hidden = self._inputs[index][start]
        kwargs = self._kwargs[index]
        for block in self.blocks[start:]:
            out = block(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if self._norm is not None:
            hidden = self._norm(hidden)
        return self._head(hidden)

    def _check_replay(self, full_logits: torch.Tensor, index: int) -> bool:
        if self._head is None:
            return False
        try:
            replayed = self._tail_logits(index, 0)
        except Exception:  # noqa: BLE001 - any failure means replay is not usable for this model
            return False
        if replayed.shape != full_logits.shape:
            return False
        scale = float(full_logits.abs().max()) or 1.0
        return float((replayed - full_logits).abs().max()) <= _REPLAY_RTOL * scale

    def score(self, start_layer: int = 0) -> Score:
        """Loss (and KL) of the model as it is now, assuming blocks before ``start_layer`` are
        unchanged since construction."""
        if not 0 <= start_layer < len(self.blocks):
            raise BitallocError(
                f"start layer {start_layer} is outside the model's {len(self.blocks)} blocks"
            )
        total_nll = 0.0
        total_kl = 0.0
        with torch.inference_mode():
            for index, ids in enumerate(self.windows):
                if self.replays:
                    logits = self._tail_logits(index, start_layer)
                else:
                    logits = self.model(input_ids=ids[None], use_cache=False).logits
                total_nll += self._nll(logits, ids)
                if self._ref_logprobs is not None:
                    ref = self._ref_logprobs[index]
                    logq = F.log_softmax(logits[0, :-1].float(), dim=-1)
                    total_kl += float((ref.exp() * (ref - logq)).sum())
        kl = total_kl / self.tokens if self.keeps_logprobs else None
        return Score(loss=total_nll / self.tokens, kl=kl)
