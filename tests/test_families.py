"""The whole path (discover, profile, solve, verify, apply, pack, KV) on tiny models of other
architecture families than Llama: Gemma 3, Qwen2, Qwen3 and Phi-3 (see tests/families.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from bitalloc import allocate
from bitalloc.formats import parse_format
from bitalloc.kernels import cpu
from bitalloc.models import discover_units, excluded_parameters, get_linear
from bitalloc.packed import load_packed, packed_layers, save_packed
from bitalloc.planning import tie_groups
from tests.allocations import small_prepare
from tests.conftest import TEXT
from tests.families import BOS, FAMILIES, SLIDING_WINDOW, decoder_linears

FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"
BUDGET = 4.0
#: Small settings shared by every allocate call here: 64-token windows, a few hundred tokens,
#: and repair held to a few short measurements (its full budget is tested on the tiny Llama).
SETTINGS = {
    "formats": FORMATS,
    "seq_len": 64,
    "calibration_tokens": 256,
    "eval_tokens": 256,
    "repair_budget": 8,
    "repair_tokens": 256,
    "progress": False,
}
#: Families whose tokenizer puts a BOS before every text.
WITH_BOS = {"gemma3", "phi3"}
#: Families whose blocks fuse q/k/v into one Linear and gate/up into another.
FUSED = {"phi3"}


def _files(directory):
    cal, ev = directory / "cal.txt", directory / "eval.txt"
    cal.write_text(TEXT)
    ev.write_text(TEXT[::-1])
    return cal, ev


def _run(family, directory, **overrides):
    """``allocate`` on a fresh model of ``family`` with :data:`SETTINGS`; returns the model,
    its tokenizer and the allocation."""
    model, tok = FAMILIES[family]()
    cal, ev = _files(directory)
    settings = {**SETTINGS, "calibration": cal, "evaluation": ev, **overrides}
    return model, tok, allocate(model, BUDGET, tokenizer=tok, **settings)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def allocated(request, tmp_path_factory):
    """Per family: model, tokenizer and its verified Fisher allocation at :data:`BUDGET` (one
    run shared by the tests that check it, apply it and pack it)."""
    directory = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE_DIR", str(directory / "cache"))
        model, tok, alloc = _run(request.param, directory, verify=True)
    return request.param, model, tok, alloc


def _ids(tok, n: int = 2, seq_len: int = 32) -> torch.Tensor:
    ids = tok(TEXT[: n * seq_len * 2], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _fake_quantized_copy(model, alloc):
    """The model with each unit's weight replaced by its format's ``fake_quantize`` with the
    importance the allocation records, done here unit by unit rather than through
    bitalloc.apply."""
    importance = alloc.importance()
    assert importance is not None  # the default clipping is weighted
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, fmt in alloc.formats.items():
            linear = get_linear(reference, name)
            weighted = parse_format(fmt).fake_quantize(linear.weight, importance.of(name))
            linear.weight.copy_(weighted)
    return reference


# --- discovery and data ------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_units_are_every_linear_of_the_decoder_layers(family):
    model, _ = FAMILIES[family]()
    units = discover_units(model)
    assert [u.name for u in units] == decoder_linears(model)
    total = sum(p.numel() for p in model.parameters())  # tied tensors once
    assert sum(u.numel for u in units) + sum(excluded_parameters(model, units).values()) == total
    roles = {u.role for u in units}
    ties = tie_groups(units, "qkv,gateup")
    if family in FUSED:
        # One unit per fused projection, in the fusion group the separate ones would form;
        # there is nothing to tie.
        assert roles == {"qkv", "o", "gateup", "down"}
        for u in units:
            kind = {"qkv": "qkv", "gateup": "gateup"}.get(u.role)
            assert u.group == (f"model.layers.{u.layer}.{kind}" if kind else u.name)
        assert ties == []
    else:
        assert roles == {"q", "k", "v", "o", "gate", "up", "down"}
        assert sorted(len(members) for members in ties) == [2, 2, 3, 3]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_window_starts_with_the_tokenizers_prefix(family, tmp_path):
    model, tok = FAMILIES[family]()
    prep = small_prepare(model, tok, _files(tmp_path), FORMATS)
    text = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert BOS not in text
    for windows in (prep.calibration_windows(), prep.evaluation_windows(256)):
        assert windows.shape[1] == 64 and int(windows.max()) < model.config.vocab_size
        if family in WITH_BOS:
            assert (windows[:, 0] == BOS).all() and not (windows[:, 1:] == BOS).any()
        else:
            assert not (windows == BOS).any()
    # Without a prefix the first window is the text itself; with one, the text follows it.
    body = prep.calibration_windows()[0, 1 if family in WITH_BOS else 0 :]
    assert body.tolist() == text[: len(body)]


# --- allocate, verify, apply, pack -------------------------------------------------------------
def test_allocation_meets_its_budget_and_verify_measured_it(allocated):
    family, model, _, alloc = allocated
    assert alloc.avg_bits <= BUDGET + 1e-9 and alloc.data.budget.avg_bits == BUDGET
    assert [u.name for u in alloc.data.units] == decoder_linears(model)
    assert alloc.data.profile.method == "fisher"
    m = alloc.measured
    assert m is not None and m.eval_tokens == 4 * 63 and alloc.data.repair is not None
    within = [f for f, bits in m.baseline_avg_bits.items() if bits <= BUDGET + 1e-9]
    assert within, m.baseline_avg_bits
    for fmt in within:
        assert m.perplexity <= m.baselines[fmt] * (1 + 1e-9), (family, fmt, m)


def test_applied_allocation_computes_the_fake_quantized_model(allocated):
    _, model, tok, alloc = allocated
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids(tok)
    applied = _logits(alloc.apply(model, progress=False), ids)
    assert torch.equal(applied, _logits(_fake_quantized_copy(model, alloc), ids))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_packed_model_saves_loads_and_computes_the_fake_quantized_model(allocated, tmp_path):
    family, model, tok, alloc = allocated
    ids = _ids(tok)
    reference = _logits(_fake_quantized_copy(model, alloc), ids)
    packed = alloc.apply(model, packed=True, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    assert set(packed_layers(packed)) == set(alloc.formats)
    out = save_packed(packed, tmp_path / "packed", tokenizer=tok, allocation=alloc)
    loaded = load_packed(out, progress=False)  # CPU paths chosen by measuring
    rel = float((_logits(loaded.model, ids) - reference).norm() / reference.norm())
    assert rel < cpu.DEFAULT_TOLERANCE, rel
    exact = load_packed(out, cpu_path=cpu.UNPACK_MATMUL, progress=False).model
    assert torch.equal(_logits(exact, ids), _logits(packed, ids))
    assert {n: layer.format.name for n, layer in packed_layers(exact).items()} == alloc.formats
    biased = {n for n, u in loaded.manifest.units.items() if u.bias}
    expected = {n for n in alloc.formats if get_linear(model, n).bias is not None}
    assert biased == expected and (family != "qwen2" or len(biased) == 6)
    if model.config.tie_word_embeddings:
        assert exact.lm_head.weight is exact.model.embed_tokens.weight
    assert loaded.tokenizer(TEXT[:200])["input_ids"] == tok(TEXT[:200])["input_ids"]


# --- another profiler, ties --------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_profiler_with_fused_projections_tied(family, tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path / "cache"))
    model, _, alloc = _run(family, tmp_path, profiler="output", ties="qkv,gateup")
    assert alloc.data.profile.method == "output" and alloc.avg_bits <= BUDGET + 1e-9
    assert [u.name for u in alloc.data.units] == decoder_linears(model)
    for members in tie_groups(discover_units(model), "qkv,gateup"):
        assert len({alloc.formats[n] for n in members}) == 1, members


# --- KV cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_allocation_meets_its_budget(family, tmp_path, monkeypatch):
    from bitalloc.kv.formats import kv_units

    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path / "cache"))
    model, _, alloc = _run(family, tmp_path, kv_avg_bits=4.0, kv_tokens=128, verify=True)
    kv = alloc.data.kv
    assert alloc.avg_bits <= BUDGET + 1e-9 and kv.avg_bits <= 4.0 + 1e-9
    units = kv_units(model)
    assert set(alloc.kv_formats) == {u.name for u in units} and len(units) == 2
    if family == "gemma3":
        assert [u.window for u in units] == [SLIDING_WINDOW, None]
    assert alloc.measured is not None and alloc.measured.kv_baselines
    # The uniform KV baselines' bits are counted layer by layer (a sliding layer stores less).
    for name, bits in alloc.measured.kv_baseline_avg_bits.items():
        assert bits == pytest.approx(kv.uniform_avg_bits(name), rel=1e-12)
