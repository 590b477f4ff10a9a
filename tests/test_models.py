import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.models import (
    default_gguf_path,
    discover_units,
    excluded_parameters,
    get_linear,
    load_model,
    model_fingerprint,
)


def test_units_of_a_llama(tiny_model):
    units = discover_units(tiny_model)
    assert len(units) == 2 * 7
    assert [u.role for u in units[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    q, k, v, o, gate, up, down = units[:7]
    assert q.name == "model.layers.0.self_attn.q_proj" and q.layer == 0
    assert q.group == k.group == v.group == "model.layers.0.qkv"
    assert gate.group == up.group == "model.layers.0.gateup"
    assert o.group == o.name and down.group == down.name
    assert k.shape == (32, 64) and down.shape == (64, 96) and down.numel == 64 * 96
    assert units[-1].layer == 1


def test_excluded_parameters_count_tied_weights_once(tiny_model):
    units = discover_units(tiny_model)
    excluded = excluded_parameters(tiny_model, units)
    assert excluded["model.embed_tokens.weight"] == 256 * 64
    assert "lm_head.weight" not in excluded  # tied to the embedding
    total = sum(p.numel() for p in tiny_model.parameters())
    assert sum(excluded.values()) + sum(u.numel for u in units) == total


def test_fingerprint_tracks_weights(tiny_model):
    units = discover_units(tiny_model)
    before = model_fingerprint(tiny_model, units)
    assert model_fingerprint(tiny_model, units) == before
    with torch.no_grad():
        get_linear(tiny_model, units[3].name).weight[0, 0] += 1.0
    assert model_fingerprint(tiny_model, units) != before


def test_load_directory_with_safetensors(tmp_path, tiny_model, byte_tokenizer):
    tiny_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(tmp_path, tokenizer=byte_tokenizer)
    assert len(discover_units(loaded.model)) == 14
    sd = tiny_model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, sd[name])


def test_pickled_checkpoints_are_refused(tmp_path, tiny_model):
    tiny_model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BitallocError, match="pickled weights are refused"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing", "does not exist"),
        (b"hello", "weights.pt", "neither a GGUF"),
        (b"GGUF\x00garbage", "broken.gguf", "could not read GGUF"),
    ],
)
def test_bad_model_paths(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BitallocError, match=match):
        load_model(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(BitallocError, match="config.json"):
        load_model(tmp_path)


def test_module_without_tokenizer(tiny_model):
    with pytest.raises(BitallocError, match="tokenizer"):
        load_model(tiny_model)


def test_unknown_unit_name(tiny_model):
    with pytest.raises(BitallocError, match="does not exist"):
        get_linear(tiny_model, "model.layers.9.self_attn.q_proj")
    with pytest.raises(BitallocError, match="not a Linear"):
        get_linear(tiny_model, "model.layers.0")


def test_default_gguf_is_installed():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_default_model_units(default_model):
    units = discover_units(default_model.model)
    assert len(units) == 210
    assert {u.role for u in units} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert units[0].shape == (576, 576) and units[-1].shape == (576, 1536)
    excluded = excluded_parameters(default_model.model, units)
    assert excluded["model.embed_tokens.weight"] == 49152 * 576
    assert sum(u.numel for u in units) == 106_168_320


def test_fused_projections_are_one_unit_in_their_fusion_group():
    from bitalloc.planning import tie_groups
    from tests.families import decoder_linears, phi3

    model, _ = phi3()
    units = discover_units(model)
    assert [u.name for u in units] == decoder_linears(model)
    by_role = {u.role: u for u in units if u.layer == 0}
    assert set(by_role) == {"qkv", "o", "gateup", "down"}
    qkv, gateup = by_role["qkv"], by_role["gateup"]
    assert qkv.name == "model.layers.0.self_attn.qkv_proj" and qkv.group == "model.layers.0.qkv"
    assert qkv.shape == (64 + 2 * 32, 64)  # q, then k and v of 2 kv heads x 16
    assert gateup.name == "model.layers.0.mlp.gate_up_proj"
    assert gateup.group == "model.layers.0.gateup" and gateup.shape == (2 * 96, 64)
    # A tie of the fused kinds has nothing left to tie: each group is one matrix already.
    assert tie_groups(units, "qkv,gateup") == []
