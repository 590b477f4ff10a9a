import math

import pytest
import torch
import torch.nn.functional as F

from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.evaluate import perplexity
from bitalloc.models import discover_units
from bitalloc.sensitivity.replay import LayerReplay
from tests.conftest import make_tiny_llama


def _windows(n=3, seq_len=24):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, seq_len), generator=g)


def _kl(model, ids, ref_logits):
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[:, :-1].float()
    ref = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(logits, dim=-1)
    return float((ref.exp() * (ref - logq)).sum(-1).mean())


@pytest.mark.parametrize("unit_index", [0, 9, 13])
def test_replay_from_the_changed_layer_equals_a_full_forward(unit_index):
    model = make_tiny_llama(layers=3)
    ids = _windows()
    with torch.inference_mode():
        ref_logits = model(input_ids=ids).logits
    replay = LayerReplay(model, ids, keep_logprobs=True)
    assert replay.replays
    assert replay.base_loss == pytest.approx(math.log(perplexity(model, ids).perplexity), 1e-6)
    unit = discover_units(model)[unit_index]
    with fake_quantized(model, {unit.name: "int2-g32"}):
        score = replay.score(unit.layer)
        full = math.log(perplexity(model, ids).perplexity)
        kl = _kl(model, ids, ref_logits)
    assert score.loss == pytest.approx(full, rel=1e-5)
    assert score.kl == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert score.kl > 0
    # Unchanged model: zero KL, base loss.
    base = replay.score(0)
    assert base.loss == pytest.approx(replay.base_loss, rel=1e-6) and base.kl == pytest.approx(0)


def test_models_without_a_llama_tail_are_scored_by_full_forwards():
    model = make_tiny_llama(layers=2)
    ids = _windows(n=2)

    def soft_cap(module, args, kwargs, output):
        # A tail the replay does not know about (like Gemma's logit soft-capping).
        output.logits = 3.0 * torch.tanh(output.logits / 3.0)
        return output

    model.register_forward_hook(soft_cap, with_kwargs=True)
    replay = LayerReplay(model, ids)
    assert not replay.replays
    unit = discover_units(model)[10]
    with fake_quantized(model, {unit.name: "int2-g32"}):
        score = replay.score(unit.layer)
        full = math.log(perplexity(model, ids).perplexity)
    assert score.loss == pytest.approx(full, rel=1e-6)
    assert score.kl is None


def test_bad_windows_and_layers_raise():
    model = make_tiny_llama()
    with pytest.raises(BitallocError, match="windows must be"):
        LayerReplay(model, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(BitallocError, match="windows must be"):
        LayerReplay(model, torch.zeros(2, 1, dtype=torch.long))
    replay = LayerReplay(model, _windows(n=1))
    with pytest.raises(BitallocError, match="outside the model"):
        replay.score(5)


@pytest.mark.parametrize(
    "fields",
    [
        {},  # sliding then global layer, final logit soft cap
        {"final_logit_softcapping": None},
        {"layer_types": ["full_attention", "sliding_attention"], "final_logit_softcapping": 5.0},
    ],
    ids=["softcap-sliding-global", "no-softcap", "global-sliding-tight-cap"],
)
def test_gemma3_replays_with_its_soft_cap_and_each_layers_mask(fields):
    """Gemma 3 passes its sliding and global layers different masks and rotary embeddings, and
    soft-caps the final logits: replay reruns each block with its own arguments and applies the
    cap, so it is used (not the full-forward fallback) and scores what a full forward scores."""
    from tests.families import SLIDING_WINDOW, gemma3

    model, _ = gemma3(**fields)
    ids = _windows(n=2, seq_len=SLIDING_WINDOW + 8)  # longer than the window: it slides
    with torch.inference_mode():
        ref_logits = model(input_ids=ids).logits
    replay = LayerReplay(model, ids, keep_logprobs=True)
    assert replay.replays
    for unit in (discover_units(model)[0], discover_units(model)[-1]):
        with fake_quantized(model, {unit.name: "int2-g32"}):
            score = replay.score(unit.layer)
            full = math.log(perplexity(model, ids).perplexity)
            kl = _kl(model, ids, ref_logits)
        assert score.loss == pytest.approx(full, rel=1e-5)
        assert score.kl == pytest.approx(kl, rel=1e-4, abs=1e-9) and score.kl > 0
