"""Scale folding recorded in an allocation: encoding, JSON, apply (fake, packed), allocate, CLI."""

from __future__ import annotations

import base64
import copy
import json
import math

import pytest
import torch
from torch import nn

from bitalloc.allocation import Allocation
from bitalloc.apply import fake_quantize_
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.folding import fold_scales
from bitalloc.folding_record import (
    FOLD_TOKENS,
    FOLDED_ATTR,
    ScaleFolding,
    apply_recorded_,
    decode_scales,
    encode_scales,
    fold_model_,
    is_folded,
    scales_digest,
)
from bitalloc.models import load_model
from bitalloc.packed import load_packed, pack_model
from tests.allocations import cycling_allocation, small_allocate, small_prepare
from tests.conftest import make_tiny_llama, random_windows
from tests.hfdirs import tiny_model_dir

CAL = random_windows(n=4, seq_len=32, seed=1)
IDS = random_windows(n=2, seq_len=24, seed=2)
FAKE = ("int3-g32", "int4-g32", "int8-g32", "fp16")
PACKED = ("int3-g32", "int4-g32", "int8-g64", "fp16")  # formats the packed kernels support
FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _outliers(model: nn.Module) -> nn.Module:
    """A few large hidden channels, so that the fold moves weights by more than rounding."""
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:3] *= 20.0
            block.post_attention_layernorm.weight[3:6] *= 20.0
    return model


@pytest.fixture
def original():
    return _outliers(make_tiny_llama(seed=4))


@pytest.fixture
def folded(original):
    """(folded copy of ``original``, its record)."""
    model = copy.deepcopy(original)
    return model, fold_model_(model, CAL)


# ---------------------------------------------------------------- encoding


def test_encode_decode_round_trip_is_exact(original):
    scales = fold_scales(original, CAL)
    encoded = encode_scales(scales)
    assert list(encoded) == sorted(scales)
    raw = base64.b64decode(encoded["0.up-down"])
    assert len(raw) == 2 * 96  # little-endian float16
    assert torch.equal(
        torch.frombuffer(bytearray(raw), dtype=torch.float16).float(), scales["0.up-down"]
    )
    decoded = decode_scales(encoded, scales_digest(encoded))
    assert decoded.keys() == scales.keys()
    assert all(torch.equal(decoded[k], scales[k]) for k in scales)


def test_encode_refuses_scales_a_record_would_not_reproduce():
    with pytest.raises(BitallocError, match="not exactly representable in float16"):
        encode_scales({"0.v-o": torch.tensor([1.0, 1.0 + 1e-4])})
    with pytest.raises(BitallocError, match="finite and positive"):
        encode_scales({"0.v-o": torch.tensor([1.0, 0.0])})
    with pytest.raises(BitallocError, match="non-empty 1-D"):
        encode_scales({"0.v-o": torch.ones(2, 2)})


def test_decode_errors_name_the_problem():
    good = encode_scales({"0.v-o": torch.tensor([0.5, 2.0])})
    digest = scales_digest(good)
    tampered = encode_scales({"0.v-o": torch.tensor([0.5, 4.0])})
    with pytest.raises(BitallocError, match="do not match their scales_sha256"):
        decode_scales(tampered, digest)
    with pytest.raises(BitallocError, match="not valid base64"):
        decode_scales({"0.v-o": "@@@@"})
    with pytest.raises(BitallocError, match="3 bytes, not a whole number of float16"):
        decode_scales({"0.v-o": base64.b64encode(b"abc").decode()})
    with pytest.raises(BitallocError, match="holds no scales"):
        decode_scales({})


def test_fold_model_records_and_marks(original, folded):
    model, record = folded
    assert record.alpha == 0.5 and record.layers == 2 and record.tokens == CAL.numel()
    assert record.pairs == ["norm-qkv", "norm-gateup", "v-o", "up-down"]
    assert record.outlier_ratio_after < record.outlier_ratio_before
    assert record.scales_sha256 == scales_digest(record.scales)
    assert getattr(model, FOLDED_ATTR) == record.scales_sha256 and is_folded(model, record)
    assert not is_folded(original, record)
    # The recorded scales fold a fresh copy into exactly the same weights.
    again = copy.deepcopy(original)
    assert apply_recorded_(again, record) is True
    assert _same_state(again, model) and not _same_state(again, original)
    assert apply_recorded_(again, record) is False  # marked: not folded twice
    assert _same_state(again, model)
    with pytest.raises(BitallocError, match="already scale-folded"):
        fold_model_(model, CAL)


def test_model_folded_for_another_record_is_refused(original, folded):
    model, record = folded
    other = fold_model_(copy.deepcopy(original), CAL, alpha=0.3)
    alloc = cycling_allocation(original, FAKE).with_scale_folding(other)
    before = copy.deepcopy(model)
    with pytest.raises(BitallocError, match="scale-folded for another allocation"):
        alloc.apply(model, inplace=True)
    assert _same_state(model, before)


# ---------------------------------------------------------------- the allocation


def test_allocation_json_round_trip_and_tampering(tmp_path, original, folded):
    _, record = folded
    alloc = cycling_allocation(original, FAKE).with_scale_folding(record)
    assert "scale folding (alpha 0.5)" in alloc.summary()
    alloc.save(tmp_path / "a.json")
    again = Allocation.load(tmp_path / "a.json")
    assert again.to_json() == alloc.to_json()
    assert again.data.scale_folding == record

    doc = json.loads((tmp_path / "a.json").read_text())
    key = "1.up-down"
    values = decode_scales(doc["scale_folding"]["scales"])[key]
    values[0] = values[0] * 2
    doc["scale_folding"]["scales"][key] = encode_scales({key: values})[key]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(BitallocError, match="do not match their scales_sha256"):
        Allocation.load(tmp_path / "bad.json")

    doc = alloc.to_json()
    doc["scale_folding"]["pairs"] = ["norm-qkv"]
    with pytest.raises(BitallocError, match="for a pair not in"):
        Allocation(type(alloc.data).model_validate(doc))

    doc = alloc.to_json()
    del doc["scale_folding"]  # files from before scale folding still load
    assert Allocation(type(alloc.data).model_validate(doc)).data.scale_folding is None


def test_apply_folds_the_original_then_quantizes(original, folded):
    model, record = folded
    alloc = cycling_allocation(original, FAKE).with_scale_folding(record)
    untouched = copy.deepcopy(original)
    expected = fake_quantize_(copy.deepcopy(model), alloc.formats)

    result = alloc.apply(original)
    assert _same_state(original, untouched)  # the caller's model is unchanged
    assert _same_state(result, expected)
    assert torch.equal(_logits(result), _logits(expected))
    # Quantizing the unfolded weights with these formats is a different model.
    plain = fake_quantize_(copy.deepcopy(original), alloc.formats)
    assert not torch.equal(_logits(plain), _logits(expected))

    # A model already folded by the record is quantized as it is, not folded twice.
    assert _same_state(alloc.apply(model), expected)
    assert _same_state(alloc.apply(result), fake_quantize_(copy.deepcopy(expected), alloc.formats))

    alloc.apply(original, inplace=True)
    assert _same_state(original, expected) and is_folded(original, record)


def test_apply_packed_folds_first(original, folded):
    model, record = folded
    alloc = cycling_allocation(original, PACKED).with_scale_folding(record)
    untouched = copy.deepcopy(original)
    expected = pack_model(model, alloc.formats, cpu_path="unpack-matmul")

    packed = alloc.apply(original, packed=True, cpu_path="unpack-matmul")
    assert _same_state(original, untouched)
    assert _same_state(packed, expected)
    assert torch.equal(_logits(packed), _logits(expected))

    with pytest.raises(BitallocError, match="unknown CPU path"):
        alloc.apply(original, inplace=True, packed=True, cpu_path="fastest")
    assert _same_state(original, untouched)  # refused before folding

    alloc.apply(original, inplace=True, packed=True, cpu_path="unpack-matmul")
    assert _same_state(original, expected)


# ---------------------------------------------------------------- allocate and the CLI


def _allocate(model, tok, files, **kw):
    return small_allocate(model, tok, files, 4.5, FORMATS, **kw)


def test_allocate_with_scale_folding(tiny_model, byte_tokenizer, text_files, isolated_cache):
    _outliers(tiny_model)
    untouched = copy.deepcopy(tiny_model)
    plain = _allocate(tiny_model, byte_tokenizer, text_files)
    alloc = _allocate(tiny_model, byte_tokenizer, text_files, scale_folding=True)
    assert _same_state(tiny_model, untouched) and not hasattr(tiny_model, FOLDED_ATTR)

    record = alloc.data.scale_folding
    assert isinstance(record, ScaleFolding) and plain.data.scale_folding is None
    assert record.alpha == 0.5 and record.layers == 2
    assert record.tokens == FOLD_TOKENS  # the first 64 of the text's 100 windows of 64
    assert record.outlier_ratio_after < record.outlier_ratio_before
    # The profile was made on the folded weights, in its own cache entry.
    assert alloc.data.profile.model_fingerprint != plain.data.profile.model_fingerprint
    assert alloc.data.profile.cache == "miss"
    assert math.isfinite(alloc.data.predicted_loss)

    again = _allocate(tiny_model, byte_tokenizer, text_files, scale_folding=0.5)
    # The same fold (to the bit) finds the folded profile in the cache.
    assert again.data.scale_folding.scales_sha256 == record.scales_sha256
    assert again.data.profile.cache == "hit"
    assert again.formats == alloc.formats


def test_allocate_folding_with_verify_and_checks(
    tmp_path, tiny_model, byte_tokenizer, text_files, isolated_cache
):
    alloc = _allocate(
        tiny_model,
        byte_tokenizer,
        text_files,
        scale_folding=0.3,
        verify=True,
        repair_tokens=256,
        repair_budget=4,
    )
    assert alloc.data.scale_folding.alpha == 0.3
    assert alloc.data.repair is not None and alloc.measured is not None

    from bitalloc.allocator import profile_model

    prep = small_prepare(tiny_model, byte_tokenizer, text_files, FORMATS)
    profile_model(prep, calibration_tokens=256, progress=False).save(tmp_path / "p.json")
    with pytest.raises(BitallocError, match="other weights.*scale folding changed the weights"):
        _allocate(
            tiny_model, byte_tokenizer, text_files, scale_folding=True, profile=tmp_path / "p.json"
        )
    with pytest.raises(BitallocError, match=r"alpha must be in \(0, 1\)"):
        _allocate(tiny_model, byte_tokenizer, text_files, scale_folding=1.5)

    from bitalloc.allocator import measure

    with pytest.raises(BitallocError, match="made on a scale-folded model"):
        measure(prep, alloc, eval_tokens=256, progress=False)


def test_cli_allocate_eval_and_apply_fold(tmp_path, text_files, isolated_cache, capsys):
    source = tiny_model_dir(tmp_path / "source", seed=4)
    cal, ev = (str(f) for f in text_files)
    common = ["--model", str(source), "--formats", FORMATS, "--calibration", cal]
    common += ["--evaluation", ev, "--seq-len", "64", "--quiet"]
    out = tmp_path / "alloc.json"
    args = ["allocate", *common, "--avg-bits", "4.5", "--scale-folding", "--calibration-tokens"]
    args += ["256", "--eval-tokens", "256", "--verify", "--no-repair", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "scale folding (alpha 0.5, 4 pairs, 2 layers" in printed
    assert "outlier ratio" in printed and "| scale folding (alpha 0.5)" in printed
    alloc = Allocation.load(out)
    assert alloc.data.scale_folding is not None
    ppl = alloc.measured.perplexity

    # eval folds the freshly loaded model first, so it measures what allocate measured.
    assert main(["eval", *common, "--allocation", str(out), "--eval-tokens", "256"]) == 0
    assert f"ppl {ppl:9.3f}" in capsys.readouterr().out

    # apply goes through Allocation.apply: the saved model holds the folded norms.
    assert (
        main(
            [
                "apply",
                "--allocation",
                str(out),
                "--model",
                str(source),
                "--out",
                str(tmp_path / "packed"),
            ]
        )
        == 0
    )
    folded = load_model(source).model
    apply_recorded_(folded, alloc.data.scale_folding)
    packed = load_packed(tmp_path / "packed", cpu_path="unpack-matmul").model
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(packed.state_dict()[norm], folded.state_dict()[norm])
    assert not torch.equal(packed.state_dict()[norm], load_model(source).model.state_dict()[norm])

    assert main(["allocate", *common, "--avg-bits", "4.5", "--scale-folding", "1.5"]) == 2
    assert "alpha must be in (0, 1)" in capsys.readouterr().err
