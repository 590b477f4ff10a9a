"""Measured quality: perplexity on held-out token windows.

Protocol: the evaluation split is cut into non-overlapping windows of ``seq_len`` tokens
(:func:`bitalloc.data.windows`); each window is scored independently, every token after the
first is predicted from the tokens before it in the same window, and perplexity is
exp(total negative log-likelihood / number of predicted tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    """Result of one evaluation."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
    logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on (n, seq_len) token windows, batched under inference mode.

    ``logits_of(ids)`` computes a batch's logits; the default is ``model(input_ids=ids).logits``
    (the KV-cache evaluation passes one that runs the model with a quantized cache).
    """
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(windows), batch_size)
            for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
                ids = windows[start : start + batch_size]
                out = model(input_ids=ids).logits if logits_of is None else logits_of(ids)
                logits = out[:, :-1].float()
                targets = ids[:, 1:].to(logits.device)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += float(nll)
                total_tokens += targets.numel()
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, len(windows), windows.shape[1])
