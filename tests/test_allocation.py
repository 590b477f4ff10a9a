import json

import pytest
import torch

from bitalloc.allocation import Allocation, UnitChoice
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.models import discover_units, get_linear


def _allocation(model, formats=("int2-g32", "int4-g64", "fp16")):
    units = discover_units(model)
    choices = [
        UnitChoice.of(u, parse_format(formats[i % len(formats)]), 0.01 * i)
        for i, u in enumerate(units)
    ]
    return Allocation.from_choices(
        model="tiny", budget=8.0, units=choices, excluded={"model.embed_tokens.weight": 256 * 64}
    )


def test_summary_counts_every_stored_bit(tiny_model):
    alloc = _allocation(tiny_model)
    units = discover_units(tiny_model)
    total = sum(parse_format(alloc.formats[u.name]).storage_bits(u.shape) for u in units)
    assert alloc.data.total_bits == total
    assert alloc.avg_bits == pytest.approx(total / sum(u.numel for u in units))
    assert alloc.data.bytes == total / 8
    assert alloc.data.excluded_numel == 256 * 64


def test_measured_size_equals_predicted_size(tiny_model):
    """Quantize each unit for real and count the stored tensors' bits."""
    alloc = _allocation(tiny_model)
    stored = 0
    for u in alloc.data.units:
        fmt = parse_format(u.format)
        w = get_linear(tiny_model, u.name).weight
        if fmt.is_float:
            stored += w.to(torch.float16).numel() * 16
        else:
            q = fmt.quantize(w)
            stored += q.codes.numel() * q.bits + (q.scales.numel() + q.zeros.numel()) * 16
    assert stored == alloc.data.total_bits


def test_save_load_round_trip(tmp_path, tiny_model):
    alloc = _allocation(tiny_model)
    alloc.save(tmp_path / "a.json")
    again = Allocation.load(tmp_path / "a.json")
    assert again.to_json() == alloc.to_json()
    doc = json.loads((tmp_path / "a.json").read_text())
    assert {"avg_bits", "budget", "units"} <= doc.keys()
    assert {"name", "format", "bits_per_weight", "numel"} <= doc["units"][0].keys()
    assert not list(tmp_path.glob(".a.json.*"))  # no temporary file left behind


def test_apply_fake_quantizes_a_copy(tiny_model):
    alloc = _allocation(tiny_model)
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    qmodel = alloc.apply(tiny_model)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, original[k])
    for u in alloc.data.units:
        w = get_linear(tiny_model, u.name).weight
        expected = parse_format(u.format).fake_quantize(w)
        assert torch.equal(get_linear(qmodel, u.name).weight, expected)
    ids = torch.arange(16)[None]
    assert torch.isfinite(qmodel(input_ids=ids).logits).all()


def test_apply_to_another_model_raises_and_changes_nothing(tiny_model):
    from tests.conftest import make_tiny_llama

    alloc = _allocation(make_tiny_llama(layers=3))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(BitallocError, match="do not exist in this model"):
        alloc.apply(tiny_model, inplace=True)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])
    wider = _allocation(make_tiny_llama(hidden=128))
    with pytest.raises(BitallocError, match="shapes differ"):
        wider.apply(tiny_model)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(extra=1), "malformed at extra"),
        (lambda d: d["units"][0].update(format="int7-g128"), "unsupported code width"),
        (lambda d: d["units"][0].update(bits_per_weight=1.0), "does not match"),
        (lambda d: d.update(avg_bits=1.0), "edited inconsistently"),
        (lambda d: d.pop("units"), "malformed at units"),
    ],
)
def test_malformed_files_raise(tmp_path, tiny_model, edit, match):
    doc = _allocation(tiny_model).to_json()
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BitallocError, match=match):
        Allocation.load(path)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2")
    with pytest.raises(BitallocError, match="not valid JSON"):
        Allocation.load(tmp_path / "x.json")
    with pytest.raises(BitallocError, match="does not exist"):
        Allocation.load(tmp_path / "none.json")


def test_tables(tiny_model):
    alloc = _allocation(tiny_model)
    assert "model.layers.1.mlp.down_proj" in alloc.table()
    layer = alloc.layer_table()
    assert layer.splitlines()[0].split()[:2] == ["layer", "bits"]
    assert "budget 8" in alloc.summary()
