"""bitalloc's importance saved as, and loaded from, llama.cpp imatrix files."""

from __future__ import annotations

import struct

import gguf
import libgguf
import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.imatrix import gguf_tensor_names, load_imatrix, save_imatrix
from bitalloc.importance import Importance, gather_importance, to_bfloat16_values
from bitalloc.models import Unit, discover_units
from tests import families
from tests.conftest import make_tiny_llama, random_windows

LLAMA_SUFFIXES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama, its units and an importance gathered on it (shared: nothing mutates)."""
    model = make_tiny_llama()
    units = discover_units(model)
    importance = gather_importance(model, units, random_windows(4, 32), progress=False)
    return model, units, importance


def _legacy_bytes(entries: dict[str, np.ndarray], ncall: int) -> bytes:
    """llama.cpp's old .dat layout: n_entries, then per entry name, ncall, nval, values."""
    out = [struct.pack("<i", len(entries))]
    for name, values in entries.items():
        raw = name.encode()
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
        out.append(np.asarray(values, dtype="<f4").tobytes())
    out.append(struct.pack("<i", ncall) + struct.pack("<i", 7) + b"cal.txt")  # last_call, dataset
    return b"".join(out)


def test_names_of_the_tiny_llama(tiny):
    model, units, _ = tiny
    names = gguf_tensor_names(model, units)
    expected = [f"blk.{i}.{s}.weight" for i in range(2) for s in LLAMA_SUFFIXES]
    assert [names[u.name] for u in units] == expected


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_names_of_other_llama_like_families(family):
    model, _ = getattr(families, family)()
    units = discover_units(model)
    names = gguf_tensor_names(model, units)
    layers = model.config.num_hidden_layers
    expected = [f"blk.{i}.{s}.weight" for i in range(layers) for s in LLAMA_SUFFIXES]
    assert sorted(names.values()) == sorted(expected)
    assert names["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"


def test_names_of_phi3_fused_projections():
    model, _ = families.phi3()
    units = discover_units(model)
    names = gguf_tensor_names(model, units)
    # llama.cpp keeps Phi-3's fusions: qkv_proj is attn_qkv, gate_up_proj is stored as ffn_up.
    assert names == {
        name: f"blk.{i}.{suffix}.weight"
        for i in range(model.config.num_hidden_layers)
        for name, suffix in [
            (f"model.layers.{i}.self_attn.o_proj", "attn_output"),
            (f"model.layers.{i}.self_attn.qkv_proj", "attn_qkv"),
            (f"model.layers.{i}.mlp.gate_up_proj", "ffn_up"),
            (f"model.layers.{i}.mlp.down_proj", "ffn_down"),
        ]
    }


def test_names_refused_for_an_unknown_type_or_module(tiny, monkeypatch):
    model, units, _ = tiny
    odd = Unit(name="model.layers.0.mlp.odd_proj", shape=(4, 64), layer=0, role="odd", group="g")
    with pytest.raises(BitallocError, match=r"odd_proj.*'llama'.*no entry for .*odd_proj\.weight"):
        gguf_tensor_names(model, [*units, odd])
    monkeypatch.setattr(model.config, "model_type", "nosucharch")
    with pytest.raises(BitallocError, match=r"q_proj.*'nosucharch' has no llama.cpp arch"):
        gguf_tensor_names(model, units)


def test_round_trip_is_exact(tiny, tmp_path):
    model, units, importance = tiny
    path = save_imatrix(importance, model, units, tmp_path / "sub" / "imatrix.gguf")
    assert path == tmp_path / "sub" / "imatrix.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == ["imatrix.gguf"]  # no temporaries
    back = load_imatrix(path, model, units)
    assert back.tokens == importance.tokens == 128
    assert sorted(back.values) == sorted(u.name for u in units)
    for unit in units:
        assert torch.equal(back.values[unit.name], importance.values[unit.name]), unit.name
    assert back.digest == importance.digest


def test_round_trip_is_exact_for_any_token_count(tiny, tmp_path):
    # mean * tokens is not exact in float32 for a token count with many significant bits; the
    # bfloat16 rounding on load must still give back every value.
    model, units, _ = tiny
    g = torch.Generator().manual_seed(1)
    values = {
        u.name: to_bfloat16_values(torch.rand(u.shape[1], generator=g) * 10 ** (u.layer * 3 - 2))
        for u in units
    }
    importance = Importance(values, 1_000_003)
    back = load_imatrix(save_imatrix(importance, model, units, tmp_path / "a.gguf"), model, units)
    assert back.tokens == 1_000_003
    assert all(torch.equal(back.values[n], values[n]) for n in values)


def test_file_is_what_llama_cpp_reads(tiny, tmp_path):
    model, units, importance = tiny
    path = save_imatrix(importance, model, units, tmp_path / "imatrix.gguf", dataset="wiki.txt")
    averages = libgguf.load_imatrix(path)
    expected = sorted(f"blk.{i}.{s}.weight" for i in range(2) for s in LLAMA_SUFFIXES)
    assert sorted(averages) == expected
    names = gguf_tensor_names(model, units)
    for unit in units:
        got = torch.from_numpy(averages[names[unit.name]])
        assert torch.equal(to_bfloat16_values(got), importance.values[unit.name])
        assert torch.allclose(got, importance.values[unit.name], rtol=1e-6, atol=0)

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields[gguf.Keys.General.TYPE].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["wiki.txt"]
    for key, value in [("imatrix.chunk_count", 0), ("imatrix.chunk_size", 512)]:
        assert fields[key].types == [gguf.GGUFValueType.UINT32]  # llama.cpp reads them as u32
        assert fields[key].contents() == value
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(units)
    sums, counts = tensors["blk.1.ffn_down.weight.in_sum2"], tensors["blk.1.ffn_down.weight.counts"]
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(sums.shape) == [96, 1] and list(counts.shape) == [1, 1]  # ggml order: (n_in, 1)
    assert float(np.asarray(counts.data).reshape(-1)[0]) == 128.0
    expected = importance.values["model.layers.1.mlp.down_proj"].double() * 128
    assert np.allclose(np.asarray(sums.data, dtype=np.float64).reshape(-1), expected.numpy())


def test_chunk_count_and_uncounted_importance(tiny, tmp_path):
    model, units, importance = tiny
    counted = save_imatrix(importance, model, units, tmp_path / "c.gguf", chunk_size=32)
    assert gguf.GGUFReader(counted).fields["imatrix.chunk_count"].contents() == 4
    # No token count (as loaded from a .dat file): written with count 1, the means kept.
    uncounted = Importance(importance.values, 0)
    back = load_imatrix(save_imatrix(uncounted, model, units, tmp_path / "u.gguf"), model, units)
    assert back.tokens == 1
    assert all(torch.equal(back.values[n], importance.values[n]) for n in importance.values)


def test_legacy_dat_file(tiny, tmp_path):
    model, units, _ = tiny
    two = units[:2]
    g = torch.Generator().manual_seed(2)
    sums = {f"blk.0.attn_{s}.weight": torch.rand(64, generator=g).numpy() * 9 for s in "qk"}
    sums["output.weight"] = np.ones(64, np.float32)  # a tensor that is no unit: ignored
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes(sums, ncall=3))
    back = load_imatrix(path, model, two)
    assert back.tokens == 0  # the .dat format records calls (chunks), not tokens
    assert sorted(back.values) == sorted(u.name for u in two)
    for unit, name in zip(two, ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]):
        mean = torch.from_numpy(sums[name].astype(np.float32) / np.float32(3))
        assert torch.equal(back.values[unit.name], to_bfloat16_values(mean))


def test_missing_and_unreadable_files(tiny, tmp_path):
    model, units, importance = tiny
    with pytest.raises(BitallocError, match=r"imatrix file .*nope\.gguf does not exist"):
        load_imatrix(tmp_path / "nope.gguf", model, units)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BitallocError, match=r"junk\.bin is not an imatrix file"):
        load_imatrix(junk, model, units)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(BitallocError, match=r"empty\.gguf is empty"):
        load_imatrix(empty, model, units)
    whole = save_imatrix(importance, model, units, tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BitallocError, match=r"cut\.gguf is truncated"):
        load_imatrix(cut, model, units)
    dat = tmp_path / "cut.dat"
    dat.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": np.ones(64, np.float32)}, 1)[:40])
    with pytest.raises(BitallocError, match=r"cut\.dat is truncated"):
        load_imatrix(dat, model, units)
    plain = tmp_path / "model.gguf"  # a GGUF file, but a model's: no in_sum2 tensors
    writer = gguf.GGUFWriter(plain, "llama")
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BitallocError, match=r"model\.gguf is a GGUF file but not an imatrix"):
        load_imatrix(plain, model, units)


def test_file_missing_a_unit_or_of_another_width(tiny, tmp_path):
    model, units, importance = tiny
    partial = save_imatrix(importance, model, units[:-1], tmp_path / "partial.gguf")
    with pytest.raises(
        BitallocError,
        match=r"partial\.gguf has no entry for unit 'model\.layers\.1\.mlp\.down_proj' "
        r"\(blk\.1\.ffn_down\.weight\); it was made for another model",
    ):
        load_imatrix(partial, model, units)

    narrow = make_tiny_llama(hidden=32, intermediate=48, heads=2, kv_heads=1)
    narrow_units = discover_units(narrow)
    narrow_imp = gather_importance(narrow, narrow_units, random_windows(1, 8), progress=False)
    other = save_imatrix(narrow_imp, narrow, narrow_units, tmp_path / "narrow.gguf")
    with pytest.raises(
        BitallocError,
        match=r"narrow\.gguf gives unit 'model\.layers\.0\.self_attn\.q_proj' "
        r"\(blk\.0\.attn_q\.weight\) 32 values, but its input has 64 columns",
    ):
        load_imatrix(other, model, units)

    dat = tmp_path / "nan.dat"
    dat.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": np.full(64, np.nan, np.float32)}, 1))
    with pytest.raises(BitallocError, match=r"nan\.dat gives unit .*q_proj.* not finite"):
        load_imatrix(dat, model, units[:1])


def test_failed_save_leaves_nothing(tiny, tmp_path):
    model, units, importance = tiny
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(BitallocError, match=r"cannot write .*blocker.*imatrix\.gguf"):
        save_imatrix(importance, model, units, blocker / "imatrix.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    assert blocker.read_text() == "a file, not a directory"

    target = tmp_path / "kept.gguf"
    target.write_bytes(b"old")
    lacking = importance.restricted(u.name for u in units[1:])
    with pytest.raises(BitallocError, match=r"no vector for unit 'model\.layers\.0\.self_attn\.q"):
        save_imatrix(lacking, model, units, target)
    values = dict(importance.values)
    values[units[3].name] = values[units[3].name][:10]
    with pytest.raises(BitallocError, match=r"o_proj.*10 values, but its input has 64 columns"):
        save_imatrix(Importance(values, 128), model, units, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "kept.gguf"]


@pytest.mark.slow
def test_default_model_names_match_its_gguf_file(default_model):
    from bitalloc.models import default_gguf_path

    units = discover_units(default_model.model)
    assert len(units) == 210
    names = gguf_tensor_names(default_model.model, units)
    in_file = {t.name for t in gguf.GGUFReader(default_gguf_path()).tensors}
    assert len(set(names.values())) == 210
    assert set(names.values()) <= in_file
    assert {n for n in in_file if n.startswith("blk.") and n.endswith(".weight")} - set(
        names.values()
    ) == {f"blk.{i}.{s}_norm.weight" for i in range(30) for s in ("attn", "ffn")}
