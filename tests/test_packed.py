import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import Float16Linear, QuantLinear
from bitalloc.packed import (
    MANIFEST,
    WEIGHTS,
    choose_cpu_paths,
    last_paths,
    load_packed,
    model_bytes,
    pack_model,
    packed_layers,
    save_packed,
    unit_bytes,
)
from tests.allocations import cycling_allocation

FORMATS = ("int2-g32", "int3-g64", "int4-g32", "int5-g32", "int6-g64", "int8-g32", "fp16")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_packed_units_take_exactly_the_predicted_bytes(tiny_model):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = alloc.apply(tiny_model, packed=True)
    layers = packed_layers(packed)
    assert list(layers) == [u.name for u in alloc.data.units]
    for u in alloc.data.units:
        layer = layers[u.name]
        assert layer.format.name == u.format
        assert isinstance(layer, Float16Linear if u.format == "fp16" else QuantLinear)
    # 64 and 96 inputs are multiples of 32, so every plane row fills its words.
    assert unit_bytes(packed) * 8 == alloc.data.total_bits
    sizes = model_bytes(packed)
    assert sizes["units"] + sizes["other"] == sizes["total"]
    # The tied embedding / lm_head counts once, with the norms and the rotary buffer, in "other".
    rotary = sum(b.numel() * b.element_size() for n, b in packed.named_buffers() if "rotary" in n)
    assert sizes["other"] == 4 * sum(e.numel for e in alloc.data.excluded) + rotary
    # The original model is untouched.
    assert not packed_layers(tiny_model)


def test_packed_model_computes_the_fake_quantized_model(tiny_model, ids):
    alloc = cycling_allocation(tiny_model, FORMATS)
    reference = _logits(alloc.apply(tiny_model), ids)
    exact = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    assert _rel(_logits(exact, ids), reference) < 1e-5
    assert last_paths(exact) == {"fp16-as-float32": 2, cpu.UNPACK_MATMUL: 12}

    tokens = exact.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = alloc.apply(tiny_model).generate(
        ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert tokens.shape == (1, 14) and torch.equal(tokens, expected)


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
def test_cpu_path_choice(tiny_model, ids):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.INT4PACK)
    choice = choose_cpu_paths(packed, cpu.INT4PACK)
    for name, path in choice.paths.items():
        fmt = alloc.formats[name]
        expected = {"int4-g32": cpu.INT4PACK, "fp16": "fp16"}.get(fmt, cpu.UNPACK_MATMUL)
        assert path == expected, (name, fmt)
    assert not choice.timings  # a forced path is not measured
    reference = _logits(alloc.apply(tiny_model), ids)
    assert _rel(_logits(packed, ids), reference) < cpu.DEFAULT_TOLERANCE
    assert last_paths(packed)[cpu.INT4PACK] == 2

    auto = choose_cpu_paths(packed, "auto", repeats=2)
    int4 = [layer for layer in packed_layers(packed).values() if layer.format.name == "int4-g32"]
    assert set(auto.timings) == {f"int4-g32 {q.shape[0]}x{q.shape[1]}" for q in int4}
    for timings in auto.timings.values():
        assert {t.path for t in timings} == set(cpu.CPU_PATHS)
        best = min((t for t in timings if t.correct), key=lambda t: t.total_s)
        assert best.path in auto.paths.values()
    assert auto.counts()["fp16"] == 2 and sum(auto.counts().values()) == 14
    assert all(packed_layers(packed)[n].cpu_path == p for n, p in auto.paths.items() if p != "fp16")


def test_save_and_load_without_the_original_weights(tmp_path, tiny_model, ids):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    out = save_packed(packed, tmp_path / "packed", allocation=alloc)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bitalloc_packed.json", "config.json", "generation_config.json", WEIGHTS]
    with safe_open(out / WEIGHTS, "pt") as f:
        keys = set(f.keys())
    int_units = [u.name for u in alloc.data.units if u.format != "fp16"]
    assert all(f"{u}.qweight" in keys and f"{u}.weight" not in keys for u in int_units)
    assert "lm_head.weight" not in keys  # tied to the embedding: stored once

    loaded = load_packed(out, cpu_path=cpu.UNPACK_MATMUL)
    assert torch.equal(_logits(loaded.model, ids), _logits(packed, ids))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.manifest.allocation == alloc.to_json()
    assert loaded.manifest.unit_bytes == loaded.manifest.predicted_unit_bytes == unit_bytes(packed)
    assert loaded.tokenizer is None
    # Saving again over a packed model replaces it.
    save_packed(loaded.model, out)
    assert load_packed(out, cpu_path=cpu.UNPACK_MATMUL).manifest.allocation is None


def _saved(tmp_path, tiny_model):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    return save_packed(packed, tmp_path / "packed", allocation=alloc), packed


def _edit_manifest(directory, edit):
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda d: d["units"]["model.layers.0.self_attn.q_proj"].update(format="int3-g32"),
            "does not match its manifest",
        ),
        (
            lambda d: d["units"]["model.layers.0.self_attn.q_proj"].update(format="int7-g32"),
            "unsupported code width 7",
        ),
        (
            lambda d: d["units"]["model.layers.0.mlp.down_proj"].update(shape=[64, 128]),
            r"\(64, 128\) in the manifest but \(64, 96\) in config.json",
        ),
        (
            lambda d: d["units"]["model.layers.0.self_attn.q_proj"].update(bias=True),
            "lacks model.layers.0.self_attn.q_proj.bias",
        ),
        (lambda d: d.update(extra=1), "malformed at extra"),
        (lambda d: d.update(planes={"3": [3]}), "another bit-plane layout"),
        (
            lambda d: d["units"].update({"model.norm": {"format": "int4-g32", "shape": [64, 64]}}),
            "not a Linear layer",
        ),
    ],
)
def test_manifest_that_does_not_match_its_tensors_raises(tmp_path, tiny_model, edit, match):
    out, _ = _saved(tmp_path, tiny_model)
    _edit_manifest(out, edit)
    with pytest.raises(BitallocError, match=match):
        load_packed(out)


def test_damaged_or_missing_files_raise(tmp_path, tiny_model):
    out, _ = _saved(tmp_path, tiny_model)
    blob = bytearray((out / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(BitallocError, match="SHA-256 differs"):
        load_packed(out)
    (out / WEIGHTS).unlink()
    with pytest.raises(BitallocError, match=f"no {WEIGHTS}"):
        load_packed(out)
    (out / MANIFEST).unlink()
    with pytest.raises(BitallocError, match="holds no packed model"):
        load_packed(out)
    with pytest.raises(BitallocError, match="unknown CPU path"):
        load_packed(out, cpu_path="gpu")


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, tiny_model, monkeypatch):
    import bitalloc.packed as packed_module

    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(packed_module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_packed(packed, tmp_path / "new")
    with pytest.raises(BitallocError, match="holds no packed model"):
        load_packed(tmp_path / "new")
    monkeypatch.undo()

    # Over an existing packed model: the old manifest no longer matches the new weights.
    out = save_packed(packed, tmp_path / "old")
    other = pack_model(tiny_model, cycling_allocation(tiny_model, ("int3-g32",)).formats)
    monkeypatch.setattr(packed_module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_packed(other, out)
    monkeypatch.undo()
    with pytest.raises(BitallocError, match="save was interrupted"):
        load_packed(out)


def test_bad_targets_and_models_raise(tmp_path, tiny_model):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BitallocError, match="not empty and holds no packed model"):
        save_packed(packed, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(BitallocError, match="no packed units"):
        save_packed(tiny_model, tmp_path / "plain")
    with pytest.raises(BitallocError, match="Hugging Face model"):
        save_packed(
            nn.Sequential(packed_layers(packed)["model.layers.0.mlp.up_proj"]), tmp_path / "x"
        )
    with pytest.raises(BitallocError, match="does not exist in this model"):
        pack_model(tiny_model, {"model.layers.9.mlp.up_proj": "int4-g32"})
    with pytest.raises(BitallocError, match="unknown CPU path"):
        pack_model(tiny_model, alloc.formats, cpu_path="fastest")
    with pytest.raises(BitallocError, match="unknown format"):
        pack_model(tiny_model, {"model.layers.0.mlp.up_proj": "int7"})
    assert not packed_layers(tiny_model)
