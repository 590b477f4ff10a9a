"""``allocate`` with a KV budget and with one weights + KV memory budget, on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from bitalloc.allocation import Allocation
from bitalloc.cli import main
from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.kv.cache import plan_cache
from bitalloc.kv.formats import kv_units, parse_kv_format
from bitalloc.kv.record import FIXED_BYTES_PER_PARAMETER
from bitalloc.models import discover_units, excluded_parameters
from tests.allocations import small_allocate

FORMATS = "int2-g32,int4-g32,int8-g32,fp16"
KV = {"kv_tokens": 128}


def _allocate(model, tok, files, avg_bits=None, **kw):
    return small_allocate(model, tok, files, avg_bits, FORMATS, **{**KV, **kw})


def test_kv_avg_bits_beside_weights_meets_both_budgets_and_round_trips(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    alloc = _allocate(tiny_model, byte_tokenizer, text_files, 4.5, kv_avg_bits=4.0, verify=True)
    kv = alloc.data.kv
    # Verify-and-repair re-solves the weights only; the KV formats survive it.
    assert alloc.data.repair is not None and alloc.measured.kv_baselines
    assert alloc.avg_bits <= 4.5 + 1e-9
    assert kv.avg_bits <= 4.0 + 1e-9 and kv.budget == 4.0
    assert kv.context_len == 64 and kv.batch_size == 1  # default context: seq_len
    assert set(alloc.kv_formats) == {u.name for u in kv_units(tiny_model)}
    # Stored bits are exactly what the formats store at that context (n_kv 2, head_dim 16).
    assert kv.total_bits == sum(
        parse_kv_format(c.format).cache_bits(64, 1, 2, 16) for c in kv.layers
    )
    assert alloc.predicted_total_loss == pytest.approx(
        alloc.data.predicted_loss + kv.predicted_loss
    )
    alloc.save(tmp_path / "a.json")
    again = Allocation.load(tmp_path / "a.json")
    assert again.kv_formats == alloc.kv_formats and again.formats == alloc.formats
    assert "KV cache:" in again.kv_table()


def test_kv_only_keeps_weights_at_fp16_and_verify_scores_through_the_cache(
    tiny_model, byte_tokenizer, text_files, isolated_cache
):
    alloc = _allocate(
        tiny_model, byte_tokenizer, text_files, kv_avg_bits=4.0, context_len=128, verify=True
    )
    assert set(alloc.formats.values()) == {"fp16"} and alloc.data.predicted_loss == 0.0
    m = alloc.measured
    assert m.kv_baselines and set(m.kv_baseline_avg_bits) == set(m.kv_baselines)
    assert m.predicted_loss_increase == pytest.approx(alloc.data.kv.predicted_loss)
    # The measurement went through the quantized cache: it differs from the unquantized model.
    assert m.perplexity != pytest.approx(m.baselines["fp16"], rel=1e-9)
    cache = alloc.kv_cache(tiny_model)
    ids = torch.randint(0, 256, (1, 24))
    with torch.inference_mode():
        tiny_model(input_ids=ids, use_cache=True, **{plan_cache(tiny_model, {}).argument: cache})
    assert cache.get_seq_length() == 24


def test_joint_memory_budget_fits_splits_and_beats_separate(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    units = kv_units(tiny_model)
    fixed = FIXED_BYTES_PER_PARAMETER * sum(
        excluded_parameters(tiny_model, discover_units(tiny_model)).values()
    )
    with pytest.raises(InfeasibleBudgetError) as err:
        _allocate(
            tiny_model, byte_tokenizer, text_files, memory_bytes=1.0, context_len=128, batch_size=4
        )
    lo, hi = err.value.feasible_range
    memory = lo + 0.3 * (hi - lo)
    alloc = _allocate(
        tiny_model,
        byte_tokenizer,
        text_files,
        memory_bytes=memory,
        context_len=128,
        batch_size=4,
        solver="ilp",
        verify=True,
    )
    joint = alloc.data.joint
    assert joint.fixed_bytes == fixed
    assert joint.total_bytes == pytest.approx(fixed + alloc.data.bytes + alloc.data.kv.bytes)
    assert joint.total_bytes <= memory
    assert alloc.data.kv.batch_size == 4 and len(alloc.data.kv.layers) == len(units)
    assert joint.separate, "no separate split fitted"
    for split in joint.separate:
        assert joint.predicted_loss <= split.total_mixed + 1e-9
    assert alloc.measured is not None and alloc.data.repair is None  # joint: measured, no repair
    alloc.save(tmp_path / "j.json")
    again = Allocation.load(tmp_path / "j.json")
    assert again.data.joint == joint
    assert "best separate" in again.kv_table()


def test_edited_kv_and_joint_records_are_refused(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    alloc = _allocate(tiny_model, byte_tokenizer, text_files, memory_bytes=60_000.0, context_len=64)
    doc = alloc.to_json()
    edited = json.loads(json.dumps(doc))
    edited["kv"]["layers"][0]["cache_bits"] += 8
    (tmp_path / "a.json").write_text(json.dumps(edited))
    with pytest.raises(BitallocError, match="edited inconsistently"):
        Allocation.load(tmp_path / "a.json")
    edited = json.loads(json.dumps(doc))
    edited["joint"]["kv_bytes"] += 1
    edited["joint"]["total_bytes"] += 1
    (tmp_path / "b.json").write_text(json.dumps(edited))
    with pytest.raises(BitallocError, match="edited inconsistently"):
        Allocation.load(tmp_path / "b.json")
    edited = json.loads(json.dumps(doc))
    edited["kv"] = None
    (tmp_path / "c.json").write_text(json.dumps(edited))
    with pytest.raises(BitallocError, match="needs the KV formats"):
        Allocation.load(tmp_path / "c.json")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"avg_bits": 4.0, "memory_bytes": 1e6, "context_len": 64}, "pass it alone"),
        ({"memory_bytes": 1e6}, "pass context_len="),
        ({"context_len": 64}, "sizes the KV cache"),
        ({"kv_avg_bits": 4.0, "solver": "rl"}, "rl solver allocates weight matrices only"),
        (
            {"memory_bytes": 1e6, "context_len": 64, "kv_profiler": "proxy"},
            "must be in nats",
        ),
        ({"kv_avg_bits": 4.0, "kv_formats": "K3V4"}, "unsupported key width 3"),
        ({"kv_avg_bits": 4.0, "batch_size": 0}, "batch_size must be a positive integer"),
        ({"kv_avg_bits": 4.0, "context_len": 1000}, "exceeds the model's maximum of 256"),
        ({"kv_avg_bits": 1.0}, "kv_avg_bits=1.0000 is outside"),
        ({"kv_avg_bits": 4.0, "scale_folding": True}, "weights stay at fp16"),
    ],
)
def test_bad_kv_requests_raise_clear_errors(
    tiny_model, byte_tokenizer, text_files, isolated_cache, kwargs, message
):
    avg_bits = kwargs.pop("avg_bits", None)
    with pytest.raises(BitallocError, match=message):
        _allocate(tiny_model, byte_tokenizer, text_files, avg_bits, **kwargs)


def test_infeasible_memory_budget_names_the_minimum(
    tiny_model, byte_tokenizer, text_files, isolated_cache
):
    with pytest.raises(InfeasibleBudgetError, match="below the minimum of") as err:
        _allocate(tiny_model, byte_tokenizer, text_files, memory_bytes=1000.0, context_len=64)
    lo, hi = err.value.feasible_range
    alloc = _allocate(tiny_model, byte_tokenizer, text_files, memory_bytes=lo, context_len=64)
    assert alloc.data.joint.total_bytes == pytest.approx(lo)
    assert alloc.data.joint.minimum_bytes == pytest.approx(lo)


def test_cli_allocates_kv_and_memory(text_files, isolated_cache, tmp_path, capsys):
    from tests.hfdirs import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    cal, ev = text_files
    common = [
        "allocate", "--model", str(model_dir), "--formats", FORMATS, "--calibration", str(cal),
        "--evaluation", str(ev), "--seq-len", "64", "--calibration-tokens", "256",
        "--kv-tokens", "128", "--quiet",
    ]  # fmt: skip
    out = tmp_path / "kv.json"
    assert main([*common, "--avg-bits", "4.5", "--kv-avg-bits", "4", "--out", str(out)]) == 0
    assert Allocation.load(out).data.kv.avg_bits <= 4.0 + 1e-9
    assert "KV cache:" in capsys.readouterr().out
    evaluate = ["eval", "--allocation", str(out), "--model", str(model_dir), "--seq-len", "64"]
    assert main([*evaluate, "--evaluation", str(ev), "--eval-tokens", "128", "--quiet"]) == 0
    assert "weights+K" in capsys.readouterr().out
    out = tmp_path / "joint.json"
    args = ["--memory", "0.08MiB", "--context-len", "64", "--batch-size", "2", "--out", str(out)]
    assert main([*common, *args]) == 0
    joint = Allocation.load(out).data.joint
    assert joint.memory_bytes == pytest.approx(0.08 * 2**20)
    assert "best separate" in capsys.readouterr().out
    assert main([*common, "--memory", "lots", "--context-len", "64"]) == 2
    assert "memory size 'lots'" in capsys.readouterr().err


def test_unreachable_budgets_fail_before_anything_is_profiled(
    tiny_model, byte_tokenizer, text_files, isolated_cache, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("profiled before the budget was checked")

    monkeypatch.setattr("bitalloc.allocator.profile_model", never)
    monkeypatch.setattr("bitalloc.kv.allocate.profile_kv", never)
    with pytest.raises(InfeasibleBudgetError, match="below the minimum"):
        _allocate(tiny_model, byte_tokenizer, text_files, memory_bytes=1.0, context_len=64)
    for avg_bits in (None, 4.5):
        with pytest.raises(InfeasibleBudgetError, match="kv_avg_bits=2.0000 is outside"):
            _allocate(tiny_model, byte_tokenizer, text_files, avg_bits, kv_avg_bits=2.0)


def test_records_refuse_a_repeated_layer_and_a_total_over_budget(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    alloc = _allocate(tiny_model, byte_tokenizer, text_files, memory_bytes=60_000.0, context_len=64)
    kv, joint = alloc.data.kv, alloc.data.joint
    with pytest.raises(BitallocError, match="lists a layer more than once"):
        kv.model_copy(update={"layers": [kv.layers[0], kv.layers[0]]}).check()
    over = joint.model_copy(update={"memory_bytes": joint.total_bytes - 1})
    with pytest.raises(BitallocError, match="over its budget"):
        over.check()


def test_kv_cache_of_an_allocation_without_kv_says_how_to_get_one(
    tiny_model, byte_tokenizer, text_files, isolated_cache
):
    alloc = _allocate(tiny_model, byte_tokenizer, text_files, 4.5)
    assert alloc.data.kv is None and alloc.kv_formats == {}
    with pytest.raises(BitallocError, match="allocate with kv_avg_bits= or memory_bytes="):
        alloc.kv_cache(tiny_model)
