"""Perplexity: the protocol of bitalloc.evaluate, checked against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from bitalloc.evaluate import perplexity
from tests.conftest import random_windows


def _direct_nll(model, windows):
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


def test_perplexity_is_exp_of_the_mean_next_token_loss(tiny_model):
    windows = random_windows(5, 24)
    tiny_model.train()
    result = perplexity(tiny_model, windows, batch_size=2)
    assert tiny_model.training  # the previous mode comes back
    tiny_model.eval()
    nll = _direct_nll(tiny_model, windows)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result.tokens, result.windows, result.seq_len) == (5 * 23, 5, 24)


def test_logits_of_replaces_the_forward(tiny_model):
    windows = random_windows(3, 16)
    calls = []

    def uniform(ids):
        calls.append(ids.shape)
        return torch.zeros(ids.shape[0], ids.shape[1], 7)

    result = perplexity(tiny_model, windows % 7, batch_size=2, logits_of=uniform)
    assert calls == [(2, 16), (1, 16)]
    # Uniform logits over 7 tokens: the loss is log 7 on every prediction.
    assert result.perplexity == pytest.approx(7.0)
