"""Streaming a checkpoint layer by layer: the sharded checkpoint is read tensor by tensor and
checked against its index, a streamed forward gives the whole model's losses, the streamed
``output`` profile equals the in-memory one, and broken checkpoints are refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import parse_palette
from bitalloc.importance import gather_importance
from bitalloc.models import discover_units
from bitalloc.sensitivity.output import OutputProfiler
from bitalloc.streaming.checkpoint import INDEX, Checkpoint
from bitalloc.streaming.model import StreamedModel, hidden_of, run_layer
from bitalloc.streaming.profile import streamed_output_profile
from tests.conftest import random_windows

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,int3-g32+gptq,fp16")


def _whole(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_checkpoint_reads_tensors_lazily_in_their_dtype(sharded):
    ckpt = Checkpoint(sharded)
    name = "model.layers.1.mlp.down_proj.weight"
    info = ckpt.info(name)
    assert info.dtype == torch.bfloat16 and info.shape == (64, 96)
    assert ckpt.tensor(name).dtype == torch.bfloat16
    assert ckpt.tensor(name, torch.float32).dtype == torch.float32
    assert set(ckpt.state_dict("model.layers.2.")) >= {"mlp.up_proj.weight"}
    assert ckpt.nbytes == sum(t.nbytes for t in ckpt.tensors.values())
    with pytest.raises(BitallocError, match="no tensor 'nope'"):
        ckpt.info("nope")


def test_streamed_forward_gives_the_whole_models_losses(sharded, monkeypatch):
    import bitalloc.streaming.model as streaming_model

    # The head in blocks of 100 rows (vocabulary 256: two full blocks and a short one).
    monkeypatch.setattr(streaming_model, "HEAD_ROWS", 100)
    ids = random_windows(seed=0, n=8, seq_len=32)  # two batches of four
    whole = _whole(sharded)
    with torch.no_grad():
        logits = whole(input_ids=ids).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none"
        ).mean(1)
    streamed = StreamedModel(sharded)
    assert [u.name for u in streamed.units] == [u.name for u in discover_units(whole)]
    inputs = streamed.first_layer_inputs(ids)
    with torch.no_grad():
        for index in range(3):
            with streamed.layer(index) as layer:
                inputs = run_layer(layer, inputs)
            # Released: the layer holds no real tensors between uses.
            assert all(p.is_meta for p in streamed.layers[index].parameters())
        got = torch.cat(
            [streamed.loss(hidden_of(b), ids[4 * k : 4 * k + 4]) for k, b in enumerate(inputs)]
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_streamed_output_profile_equals_the_in_memory_one(sharded):
    cal = random_windows(seed=0, n=8, seq_len=32)
    streamed, recorded = streamed_output_profile(
        StreamedModel(sharded), PALETTE, cal, tokens=256, progress=False
    )
    whole = _whole(sharded)
    units = discover_units(whole)
    importance = gather_importance(whole, units, cal, tokens=256, progress=False, grams=True)
    expected = OutputProfiler(tokens=256, progress=False).profile(
        whole, units, PALETTE, cal, importance=importance
    )
    assert streamed.units == expected.units and streamed.formats == expected.formats
    assert streamed.metadata["scale_source"] == expected.metadata["scale_source"] == "calibrated"
    assert streamed.metadata["scale"] == pytest.approx(expected.metadata["scale"], rel=1e-3)
    assert streamed.metadata["tokens"] == expected.metadata["tokens"] == 256
    np.testing.assert_allclose(streamed.loss, expected.loss, rtol=1e-3, atol=1e-12)
    assert recorded.windows == importance.windows
    for name in importance.values:
        assert torch.equal(recorded.values[name], importance.values[name])
    # GPTQ is scored with the Gram matrix: below rounding at the same bits, unit by unit.
    gptq, rtn = PALETTE.index(parse_palette("int3-g32+gptq")[0]), 1
    assert (streamed.loss[:, gptq] <= streamed.loss[:, rtn] * 1.0001).all()


def test_missing_shards_and_absent_tensors_are_refused(sharded, tmp_path):
    import shutil

    broken = tmp_path / "missing"
    shutil.copytree(sharded, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(BitallocError, match=f"lacks the shard.*{shard.name}"):
        Checkpoint(broken)

    lying = tmp_path / "lying"
    shutil.copytree(sharded, lying)
    index = json.loads((lying / INDEX).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(
        iter(index["weight_map"].values())
    )
    (lying / INDEX).write_text(json.dumps(index))
    with pytest.raises(BitallocError, match="do not hold.*layers.9"):
        Checkpoint(lying)

    torn = tmp_path / "torn"
    shutil.copytree(sharded, torn)
    first = sorted(torn.glob("*.safetensors"))[0]
    first.write_bytes(b"\xff" * 16)
    with pytest.raises(BitallocError, match="not a safetensors file"):
        Checkpoint(torn)

    with pytest.raises(BitallocError, match="no config.json"):
        Checkpoint(tmp_path)


def test_streamed_allocation_equals_the_in_memory_one(sharded, tmp_path):
    from bitalloc.allocation import Allocation
    from bitalloc.planning import build_problem, to_allocation
    from bitalloc.solvers import solve
    from bitalloc.streaming.allocate import allocate_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    streamed = allocate_streamed(
        sharded, 4.0, formats=[f.name for f in PALETTE], windows=cal, tokens=256, progress=False
    )
    whole = _whole(sharded)
    units = discover_units(whole)
    importance = gather_importance(whole, units, cal, tokens=256, progress=False, grams=True)
    profile = OutputProfiler(tokens=256, progress=False).profile(
        whole, units, PALETTE, cal, importance=importance
    )
    expected = to_allocation(
        units, PALETTE, profile, solve(build_problem(units, PALETTE, profile, 4.0)), 4.0, model="x"
    )
    assert streamed.formats == expected.formats
    assert streamed.avg_bits <= 4.0 and streamed.avg_bits == expected.avg_bits
    # The head and embedding are outside the allocation and reported.
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= {
        e.name for e in streamed.data.excluded
    }
    # The importance that weighted the clipping is recorded, so applying repeats it.
    streamed.save(tmp_path / "a.json")
    reloaded = Allocation.load(tmp_path / "a.json")
    unit, name = next(
        (n, f) for n, f in streamed.formats.items() if f.startswith("int") and "+" not in f
    )
    original = whole.get_submodule(unit).weight.detach().clone()
    applied = reloaded.apply(whole, calibration=cal)
    expected_weight = PALETTE[[f.name for f in PALETTE].index(name)].fake_quantize(
        original, importance.values[unit]
    )
    assert torch.equal(applied.get_submodule(unit).weight, expected_weight)


def test_resource_plan_counts_one_layer_and_divides_scoring_over_workers(sharded):
    from bitalloc.streaming.resources import Speed, plan_streamed

    speed = Speed(flops=1e10, rounding={"int2-g32": 1e7, "int4-g32": 2e7})
    one = plan_streamed(sharded, "int2-g32,int4-g32,fp16", 256, seq_len=32, speed=speed)
    four = plan_streamed(sharded, "int2-g32,int4-g32,fp16", 256, seq_len=32, workers=4, speed=speed)
    layer_params = sum(u.numel for u in StreamedModel(sharded).layer_units(0))
    assert one.memory["one layer (float32)"] == 4 * layer_params
    assert one.memory["embedding and head"] == 2 * 256 * 64 * 2  # bf16, untied
    # The peak: the common terms and the larger of the layer and loss phases, never both.
    from bitalloc.streaming.resources import LAYER_TERMS, LOSS_TERMS

    phases = {k: v for k, v in one.memory.items() if k in LAYER_TERMS + LOSS_TERMS}
    common = sum(one.memory.values()) - sum(phases.values())
    layer = sum(v for k, v in one.memory.items() if k in LAYER_TERMS)
    assert one.peak_bytes == common + max(layer, one.memory["the loss (head blocks)"])
    assert one.peak_bytes > 4 * layer_params
    scoring = "scoring (formats x units)"
    assert four.seconds[scoring] == pytest.approx(one.seconds[scoring] / 4)
    assert four.seconds["forward and statistics"] == one.seconds["forward and statistics"]
    assert "total" in one.table()
    # The export at a budget: int2 and int4 (3 and 5 bits per weight at g32, scale and zero
    # counted) mixed to meet 4 bits, half each; at 5 bits, int4 alone; without a budget, the
    # palette's mean.
    units = sum(u.numel for u in StreamedModel(sharded).units)
    for bits, per_weight in ((4.0, (1e-7 + 0.5e-7) / 2), (5.0, 0.5e-7), (None, 0.75e-7)):
        plan = plan_streamed(
            sharded, "int2-g32,int4-g32,fp16", 256, seq_len=32, speed=speed, avg_bits=bits
        )
        assert plan.seconds["export"] == pytest.approx(units * per_weight), bits
    # A config alone plans the same (a model not at hand).
    alone = plan_streamed(
        sharded / "config.json", "int2-g32,int4-g32,fp16", 256, seq_len=32, speed=speed
    )
    for term in ("embedding and head", "one layer (float32)", "its shard pages", "Gram statistics"):
        assert alone.memory[term] == one.memory[term], term
    assert alone.seconds == pytest.approx(one.seconds)
    with pytest.raises(BitallocError, match="cannot read a model config"):
        plan_streamed(sharded / INDEX, "int4-g32", 256, speed=speed)


def test_resource_plan_pays_each_rounding_calls_cost_once_per_unit(sharded):
    from dataclasses import replace

    from bitalloc.streaming.resources import Speed, plan_streamed

    base = Speed(flops=1e10, rounding={"int4-g32": 2e7, "int8-g32": 4e7})
    costly = replace(base, per_call={"int4-g32": 1e-3, "int8-g32": 2e-3})
    kw = {"seq_len": 32, "avg_bits": 5.0}  # int4-g32 alone meets 5 bits
    plain = plan_streamed(sharded, "int4-g32,int8-g32,fp16", 256, speed=base, **kw)
    paid = plan_streamed(sharded, "int4-g32,int8-g32,fp16", 256, speed=costly, **kw)
    units = len(StreamedModel(sharded).units)
    extra = {k: paid.seconds[k] - plain.seconds[k] for k in plain.seconds}
    # Scoring rounds every unit to both formats; the export rounds each unit once to int4; the
    # chain rounds each unit once to the reference format (one of the two).
    assert extra["scoring (formats x units)"] == pytest.approx(units * 3e-3)
    assert extra["export"] == pytest.approx(units * 1e-3)
    assert extra["forward and statistics"] in (
        pytest.approx(units * 1e-3),
        pytest.approx(units * 2e-3),
    )


def test_command_line_plan_and_a_clear_error_without_a_tokenizer(sharded, capsys):
    from bitalloc.cli import main

    assert main(["plan-resources", "--model", str(sharded), "--tokens", "64"]) == 0
    assert "MiB" in capsys.readouterr().out
    code = main(["allocate-streamed", "--model", str(sharded), "--avg-bits", "4", "--quiet"])
    assert code == 2
    assert "no usable tokenizer" in capsys.readouterr().err


class _NoTokenizer:
    """Stands in for a tokenizer the in-memory export requires (the tiny model has none)."""

    def save_pretrained(self, directory):
        return ()


def test_streamed_compressed_tensors_export_equals_the_in_memory_one(sharded, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bitalloc.export.compressed_tensors import export_compressed_tensors
    from bitalloc.streaming.allocate import allocate_streamed
    from bitalloc.streaming.export import export_compressed_tensors_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    alloc = allocate_streamed(
        sharded,
        5.0,
        formats="ct:int4-g32,ct:nvfp4,fp16",
        windows=cal,
        tokens=256,
        progress=False,
    )
    assert {f for f in alloc.formats.values()} & {"ct:int4-g32", "ct:nvfp4"}
    streamed = export_compressed_tensors_streamed(alloc, sharded, tmp_path / "streamed")
    whole = export_compressed_tensors(
        alloc, _whole(sharded), _NoTokenizer(), tmp_path / "whole", progress=False
    )
    assert streamed.unit_bytes == whole.unit_bytes
    assert streamed.warnings == whole.warnings
    index = json.loads((tmp_path / "streamed" / INDEX).read_text())["weight_map"]
    assert len(set(index.values())) == 4  # the outer tensors and one shard per layer
    written = {}
    for shard in set(index.values()):
        written.update(load_file(str(tmp_path / "streamed" / shard)))
    expected = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert torch.equal(written[name], value), name
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    )
    ids = random_windows(seed=3, n=2, seq_len=16)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()(input_ids=ids)
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval()(input_ids=ids)
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(BitallocError, match="exists"):
        export_compressed_tensors_streamed(alloc, sharded, tmp_path / "streamed")


@pytest.mark.xdist_group("ray")
def test_ray_workers_compress_the_same_compressed_tensors_shards(sharded, tmp_path):
    pytest.importorskip("ray")
    from bitalloc.streaming.allocate import allocate_streamed
    from bitalloc.streaming.export import export_compressed_tensors_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    alloc = allocate_streamed(
        sharded, 5.0, formats="ct:int4-g32,ct:nvfp4,fp16", windows=cal, tokens=256, progress=False
    )
    here = export_compressed_tensors_streamed(alloc, sharded, tmp_path / "here")
    ray = export_compressed_tensors_streamed(alloc, sharded, tmp_path / "ray", workers=2)
    assert ray.tensors == here.tensors and ray.warnings == here.warnings
    files = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in files:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


@pytest.mark.xdist_group("ray")
def test_ray_workers_score_as_this_process_does(sharded):
    pytest.importorskip("ray")
    cal = random_windows(seed=0, n=8, seq_len=32)
    local, _ = streamed_output_profile(
        StreamedModel(sharded), PALETTE, cal, tokens=256, progress=False
    )
    remote, _ = streamed_output_profile(
        StreamedModel(sharded), PALETTE, cal, tokens=256, progress=False, workers=2
    )
    np.testing.assert_allclose(remote.loss, local.loss, rtol=1e-5, atol=1e-12)
    assert (local.loss[:, :-1] > 0).all()


def test_a_memory_cap_below_the_plan_and_a_profiler_that_cannot_stream_are_refused(
    sharded, monkeypatch
):
    import bitalloc.streaming.allocate as streamed_allocate
    from bitalloc.streaming.allocate import allocate_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    with pytest.raises(BitallocError, match=r"allow at least \d+ MiB"):
        allocate_streamed(sharded, 4.0, windows=cal, tokens=256, max_memory=2**20)
    with pytest.raises(
        BitallocError, match="profilers that stream: output, fisher, kfac.*fits whole here"
    ):
        allocate_streamed(sharded, 4.0, windows=cal, profiler="measured")
    monkeypatch.setattr(streamed_allocate, "available_bytes", lambda: 1024)
    with pytest.raises(BitallocError, match="only the streaming profilers run it"):
        allocate_streamed(sharded, 4.0, windows=cal, profiler="hessian")


def test_a_random_checkpoint_is_written_shard_by_shard_with_a_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitalloc.streaming.synthetic import llama_config, parameter_count, write_random_llama
    from tests.export.tiny_gguf import bpe_tokenizer
    from tests.families import VOCAB

    tokenizer = bpe_tokenizer()
    config = llama_config(64, 2, 128, heads=4, kv_heads=2, vocab=VOCAB)
    path = write_random_llama(tmp_path / "random", config, tokenizer=tokenizer)
    index = json.loads((path / INDEX).read_text())["weight_map"]
    assert len(set(index.values())) == 3  # the outer tensors and one shard per layer
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert (
        AutoTokenizer.from_pretrained(path)("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    )
    small = llama_config(64, 2, 128, heads=4, kv_heads=2, vocab=16)
    with pytest.raises(BitallocError, match="vocabulary of at least"):
        write_random_llama(tmp_path / "small", small, tokenizer=tokenizer)
