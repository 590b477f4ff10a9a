"""Scoring a model whose weights changed from one decoder layer on, without recomputing the
layers before it.

Measured sensitivity quantizes one unit at a time; everything before that unit's layer is
unchanged, so its output is computed once. :class:`LayerReplay` runs the unquantized model once
over the calibration windows, keeps the input of every decoder block (and the other arguments
the model passes to it: attention mask, rotary embeddings), and later reruns only blocks
``l..L-1``, the final norm and the output head. On SmolLM2-135M this skips on average half of
the blocks per measurement. Each block is rerun with the arguments the model passed to that
block, not to the first one: models with sliding and global layers (Gemma 2/3) give the two
kinds different masks and rotary embeddings.

Replay assumes a Llama-style tail: ``norm`` beside the block list, then the output embeddings,
then the final logit soft cap when the config sets one (``final_logit_softcapping``, as Gemma
2/3). That is checked once against a full forward pass; a model whose tail differs (extra
modules, another transformation of the logits) is scored by full forward passes instead, with
the same results.
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


def _final_logit_softcap(model: nn.Module) -> float | None:
    """The cap ``c`` of the final logits (``c * tanh(logits / c)``) that the model's config sets
    (``final_logit_softcapping``, Gemma 2/3), or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0:
        return None
    return float(cap)


class _Capture:
    """Pre-hooks that record each block's hidden-state input and the rest of its call: further
    positional arguments and the keyword arguments (each block its own)."""

    def __init__(self, blocks: nn.ModuleList):
        self.inputs: list[torch.Tensor | None] = [None] * len(blocks)
        self.args: list[tuple[Any, ...]] = [()] * len(blocks)
        self.kwargs: list[dict[str, Any] | None] = [None] * len(blocks)
        self.handles = [
            block.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, block in enumerate(blocks)
        ]

    def _hook(self, index: int):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[index] = hidden.detach()
            # The tensors are shared, not copied: blocks of one kind get the same mask and
            # rotary embeddings, so a reference per block costs nothing.
            self.args[index] = tuple(args[1:])
            self.kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

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
        self._softcap = _final_logit_softcap(model)
        self._inputs: list[list[torch.Tensor]] = []
        self._args: list[list[tuple[Any, ...]]] = []
        self._kwargs: list[list[dict[str, Any]]] = []
        self._ref_logprobs: list[torch.Tensor] | None = [] if keep_logprobs else None
        losses = []
        with torch.inference_mode():
            for ids in windows:
                capture = _Capture(self.blocks)
                try:
                    logits = model(input_ids=ids[None], use_cache=False).logits
                finally:
                    capture.remove()
                if any(x is None for x in capture.inputs):
                    raise BitallocError(
                        f"{type(model).__name__} did not call every decoder block in its forward "
                        "pass; measured profiling needs a standard decoder-only model"
                    )
                self._inputs.append(list(capture.inputs))
                self._args.append(capture.args)
                self._kwargs.append(list(capture.kwargs))
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
        args, kwargs = self._args[index], self._kwargs[index]
        for layer in range(start, len(self.blocks)):
            out = self.blocks[layer](hidden, *args[layer], **kwargs[layer])
            hidden = out[0] if isinstance(out, tuple) else out
        if self._norm is not None:
            hidden = self._norm(hidden)
        logits = self._head(hidden)
        if self._softcap is not None:
            # The operations of transformers' Gemma heads, in their order: bit-identical logits.
            logits = logits / self._softcap
            logits = torch.tanh(logits)
            logits = logits * self._softcap
        return logits

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
