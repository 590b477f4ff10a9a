"""Per-input-column importance: gathered from calibration, recorded in allocations, and used
by every clipping search so that what is applied and packed is what was measured."""

from __future__ import annotations

import json

import pytest
import torch

from bitalloc.allocation import Allocation
from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.importance import (
    Importance,
    ImportanceRecord,
    gather_importance,
    to_bfloat16_values,
)
from bitalloc.models import discover_units, get_linear
from tests.conftest import make_tiny_llama, random_windows


def _inputs(model, units, windows):
    """Each unit's inputs over ``windows``, as (tokens, in_features) float64."""
    seen = {u.name: [] for u in units}
    handles = [
        get_linear(model, u.name).register_forward_hook(
            lambda m, args, out, name=u.name: seen[name].append(
                args[0].detach().reshape(-1, args[0].shape[-1]).double()
            )
        )
        for u in units
    ]
    try:
        with torch.no_grad():
            model(input_ids=windows)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def test_importance_is_each_columns_mean_squared_input_rounded_to_bfloat16(tiny_model):
    units = discover_units(tiny_model)
    windows = random_windows(6, 24)
    imp = gather_importance(tiny_model, units, windows, batch_size=4, progress=False)
    assert imp.tokens == windows.numel()
    inputs = _inputs(tiny_model, units, windows)
    for u in units:
        expected = (inputs[u.name] ** 2).mean(dim=0).float()
        got = imp.of(u.name)
        assert got.shape == (u.shape[1],)
        assert torch.equal(got, to_bfloat16_values(got))  # exactly representable
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0.0)


def test_units_reading_one_input_share_one_recorded_vector(tiny_model):
    units = discover_units(tiny_model)
    imp = gather_importance(tiny_model, units, random_windows(2, 16), progress=False)
    layer0 = {u.role: u.name for u in units if u.layer == 0}
    assert torch.equal(imp.of(layer0["q"]), imp.of(layer0["k"]))
    assert torch.equal(imp.of(layer0["gate"]), imp.of(layer0["up"]))
    record = imp.record
    # Per layer: q/k/v share one, o one, gate/up one, down one.
    assert len(record.vectors) == 4 * tiny_model.config.num_hidden_layers
    decoded = record.decode()
    assert decoded.tokens == imp.tokens
    for u in units:
        assert torch.equal(decoded.of(u.name), imp.of(u.name))


def test_an_edited_record_is_refused():
    imp = Importance({"a": to_bfloat16_values(torch.rand(8) + 0.1)}, 64)
    data = imp.record.model_dump()
    data["vectors"]["0"] = data["vectors"]["0"][::-1]
    with pytest.raises(BitallocError, match="sha256"):
        ImportanceRecord(**data).decode()


def test_a_batch_with_non_finite_inputs_is_skipped_and_none_usable_is_an_error(tiny_model):
    units = discover_units(tiny_model)
    broken = make_tiny_llama()
    with torch.no_grad():
        broken.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(BitallocError, match="--clipping mse"):
        gather_importance(broken, units, random_windows(2, 16), progress=False)


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ (w.double() - q.double()).T) ** 2).mean())


def _min_max(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round to nearest over each group's full range (widened to hold 0), fp16 scales: the
    first candidate of every clipping search."""
    out, n = w.shape
    x = w.reshape(out, n // group, group)
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1).clamp(min=0)
    qmax = 2**bits - 1
    scale = ((hi - lo).clamp(min=1e-8) / qmax).half().float().clamp(min=6.2e-5)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    codes = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, qmax)
    return ((codes - zero[..., None]) * scale[..., None]).reshape(out, n)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_clipping_is_never_worse_than_min_max_on_the_weighted_error(bits):
    # Per group the search minimises sum_j importance_j (W - Q)_j^2 over candidates that
    # start with min-max, so min-max can never beat it on that error, whatever the weights.
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 128, generator=g) * torch.rand(1, 128, generator=g) * 3
    imp = to_bfloat16_values(torch.rand(128, generator=g) ** 4 * 100)
    fmt = parse_format(f"int{bits}-g32")
    weighted = fmt.fake_quantize(w, imp)
    plain = fmt.fake_quantize(w)
    minmax = _min_max(w, bits, 32)

    def err(q):
        return ((w - q) ** 2 * imp).reshape(16, 4, 32).sum(-1)

    assert bool((err(weighted) <= err(minmax) * (1 + 1e-6)).all())
    assert bool((err(weighted) <= err(plain) * (1 + 1e-6)).all())


def test_weighted_clipping_is_never_worse_than_min_max_on_calibration_outputs():
    # Activations with a few loud columns, as in LLMs: plain MSE clipping spends the grid on
    # weights that quiet columns multiply; weighting by E[x^2] does not.
    model = make_tiny_llama(seed=3, hidden=128, intermediate=192)
    with torch.no_grad():
        loud = torch.ones(128)
        loud[::17] = 12.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(loud)
            layer.post_attention_layernorm.weight.mul_(loud)
    units = discover_units(model)
    windows = random_windows(8, 32)
    imp = gather_importance(model, units, windows, progress=False)
    inputs = _inputs(model, units, windows)
    totals = {"weighted": 0.0, "min-max": 0.0, "mse": 0.0}
    mse_loses = []
    for bits in (2, 3, 4):
        fmt = parse_format(f"int{bits}-g32")
        for u in units:
            w = get_linear(model, u.name).weight.detach()
            x = inputs[u.name]
            weighted = _output_error(x, w, fmt.fake_quantize(w, imp.of(u.name)))
            minmax = _output_error(x, w, _min_max(w, bits, 32))
            mse = _output_error(x, w, fmt.fake_quantize(w))
            assert weighted <= minmax * 1.001, (u.name, bits, weighted, minmax)
            totals["weighted"] += weighted
            totals["min-max"] += minmax
            totals["mse"] += mse
            if mse > minmax:
                mse_loses.append((u.name, bits))
    assert totals["weighted"] < totals["mse"] < totals["min-max"]
    # What the importance fixes: clipping by plain weight error loses to min-max on outputs.
    assert mse_loses


def _allocate(model, text_files, byte_tokenizer, **kw):
    from bitalloc import allocate

    cal, ev = text_files
    return allocate(
        model,
        avg_bits=4.0,
        tokenizer=byte_tokenizer,
        calibration=str(cal),
        evaluation=str(ev),
        seq_len=32,
        formats="int2-g32,int3-g32,int4-g32,int8-g32",
        calibration_tokens=128,
        progress=False,
        use_cache=False,
        **kw,
    )


def _prepare(model, text_files, byte_tokenizer, **kw):
    from bitalloc.stages.prepare import prepare

    cal, ev = text_files
    return prepare(
        model,
        formats="int2-g32,int3-g32,int4-g32,int8-g32",
        calibration=str(cal),
        evaluation=str(ev),
        tokenizer=byte_tokenizer,
        seq_len=32,
        progress=False,
        **kw,
    )


def test_an_allocation_records_its_importance_and_applies_the_weights_it_measured(
    text_files, byte_tokenizer, tmp_path
):

    model = make_tiny_llama(seed=1)
    cal, ev = text_files
    alloc = _allocate(model, text_files, byte_tokenizer)
    assert alloc.data.importance is not None
    assert "importance-weighted clipping" in alloc.summary()
    prep = _prepare(model, text_files, byte_tokenizer, use_cache=False)
    assert prep.importance.restricted(alloc.formats).digest == alloc.data.importance.sha256

    path = tmp_path / "alloc.json"
    alloc.save(path)
    loaded = Allocation.load(path)
    applied = loaded.apply(model)
    with fake_quantized(model, alloc.formats, importance=prep.importance) as measured:
        for name in alloc.formats:
            assert torch.equal(
                get_linear(applied, name).weight, get_linear(measured, name).weight
            ), name
        ids = random_windows(2, 16)
        with torch.no_grad():
            reference = measured(input_ids=ids).logits
    packed = loaded.apply(model, packed=True, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, reference, rtol=2e-3, atol=2e-3)

    # Without the record the same formats quantize differently: the record is what matters.
    plain = fake_quantized(model, alloc.formats)
    with plain as unweighted:
        differs = [
            n
            for n in alloc.formats
            if not torch.equal(get_linear(applied, n).weight, get_linear(unweighted, n).weight)
        ]
    assert differs


def test_clipping_mse_records_nothing_and_applies_plain_quantization(text_files, byte_tokenizer):
    model = make_tiny_llama(seed=1)
    alloc = _allocate(model, text_files, byte_tokenizer, clipping="mse")
    assert alloc.data.importance is None
    applied = alloc.apply(model)
    for name, fmt in alloc.formats.items():
        w = get_linear(model, name).weight
        assert torch.equal(get_linear(applied, name).weight, parse_format(fmt).fake_quantize(w))


def test_an_unknown_clipping_is_a_clear_error():
    from bitalloc.config import AllocateConfig
    from bitalloc.errors import ConfigError

    with pytest.raises(ConfigError, match="clipping"):
        AllocateConfig.from_flat(avg_bits=3.0, clipping="absmax")


def test_an_allocation_whose_importance_misses_a_unit_is_refused(
    text_files, byte_tokenizer, tmp_path
):
    model = make_tiny_llama(seed=1)
    alloc = _allocate(model, text_files, byte_tokenizer)
    data = alloc.to_json()
    dropped = sorted(data["importance"]["units"])[0]
    del data["importance"]["units"][dropped]
    record = ImportanceRecord(
        **{k: v for k, v in data["importance"].items() if k != "sha256"},
        sha256=ImportanceRecord.digest_of(
            data["importance"]["units"], data["importance"]["vectors"]
        ),
    )
    data["importance"] = record.model_dump()
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BitallocError, match=dropped):
        Allocation.load(path)


def test_measuring_with_another_clipping_than_recorded_is_refused(text_files, byte_tokenizer):
    from bitalloc.measuring import measure

    model = make_tiny_llama(seed=1)
    cal, ev = text_files
    alloc = _allocate(model, text_files, byte_tokenizer)
    prep = _prepare(model, text_files, byte_tokenizer, clipping="mse")
    with pytest.raises(BitallocError, match="clipping"):
        measure(prep, alloc, eval_tokens=64, progress=False)


def test_profiles_record_their_clipping_and_a_saved_one_must_match(
    text_files, byte_tokenizer, isolated_cache
):
    import numpy as np

    from bitalloc.stages.prepare import prepare
    from bitalloc.stages.profile import load_profile_for, profile_model

    model = make_tiny_llama(seed=1)
    cal, ev = text_files
    common = {
        "formats": "int2-g32,int3-g32,int4-g32",
        "calibration": str(cal),
        "evaluation": str(ev),
        "tokenizer": byte_tokenizer,
        "seq_len": 32,
        "progress": False,
    }
    weighted = prepare(model, **common)
    plain = prepare(model, clipping="mse", **common)
    by_weighted = profile_model(weighted, "fisher", calibration_tokens=128, progress=False)
    by_plain = profile_model(plain, "fisher", calibration_tokens=128, progress=False)
    assert by_weighted.metadata["clipping"] == "weighted"
    assert by_weighted.metadata["importance_sha256"] == weighted.importance.digest
    assert by_plain.metadata["clipping"] == "mse"
    assert by_weighted.metadata["cache_path"] != by_plain.metadata["cache_path"]
    assert not np.array_equal(by_weighted.loss, by_plain.loss)
    with pytest.raises(BitallocError, match="--clipping mse"):
        load_profile_for(weighted, by_plain)
    assert load_profile_for(plain, by_plain) is by_plain
