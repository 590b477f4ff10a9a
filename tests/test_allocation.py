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


def _solved(model):
    """An allocation with a solver record whose objective is its predicted loss."""
    from bitalloc.records import SolverSummary

    alloc = _allocation(model)
    loss = alloc.data.predicted_loss
    solver = SolverSummary(
        method="lagrangian",
        status="feasible",
        objective=loss,
        lower_bound=loss - 0.5,
        gap=0.5,
        wall_time_s=0.01,
    )
    return Allocation(alloc.data.model_copy(update={"solver": solver}))


def _write(tmp_path, doc):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(budget={"avg_bits": d["avg_bits"] * 0.9}), "over its budget"),
        (lambda d: d.update(budget={"avg_bits": 0.0}), "not a number of bits"),
        (lambda d: d.update(budget={"max_bytes": d["bytes"] * 0.9}), "over its budget"),
        (lambda d: d.update(budget={"kv_avg_bits": 4.0}), "KV cache is not within"),
        (lambda d: d.update(budget={"memory_bytes": 1e9}), "no joint record"),
        (lambda d: d.update(bytes=d["bytes"] * 2), "does not match its units"),
        (lambda d: d.update(predicted_loss=d["predicted_loss"] * 1.01), "predicted_loss"),
        (lambda d: d.update(predicted_loss=None), "predicted_loss"),
        (lambda d: d["units"][0].update(predicted_loss=5.0), "predicted_loss"),
        (lambda d: d.update(version=3), r"version 3 is not supported .*versions 1 to 2.*upgrade"),
        (lambda d: d.update(version=0), "version 0 is not supported"),
        (lambda d: d.update(excluded_numel=d["excluded_numel"] + 1), "excluded_numel"),
        (lambda d: d["solver"].update(objective=d["solver"]["objective"] * 2), "objective"),
        (lambda d: d["solver"].update(gap=0.25), "gap"),
        (lambda d: d["solver"].update(gap=None), "gap without a lower bound"),
        (lambda d: d["profile"].update(interaction_loss=0.1), "interaction"),
        (lambda d: d.update(avg_bits=str(d["avg_bits"])), "malformed at avg_bits"),
        (lambda d: d.update(numel=float(d["numel"])), "malformed at numel"),
        (lambda d: d["units"][0].update(shape=[0, 64]), "not a weight matrix"),
    ],
)
def test_recomputable_numbers_and_the_budget_are_checked_on_load(tmp_path, tiny_model, edit, match):
    from bitalloc.records import ProfileSummary

    alloc = _solved(tiny_model)
    doc = Allocation(
        alloc.data.model_copy(update={"profile": ProfileSummary(method="fisher")})
    ).to_json()
    Allocation.load(_write(tmp_path, doc))  # the unedited file loads
    edit(doc)
    with pytest.raises(BitallocError, match=match):
        Allocation.load(_write(tmp_path, doc))


def test_measured_and_repair_numbers_are_checked_on_load(tmp_path, tiny_model):
    import math

    from bitalloc.allocation import Measured, Repair

    alloc = _allocation(tiny_model)
    loss = alloc.data.predicted_loss
    measured = Measured(
        perplexity=12.0,
        baselines={"fp16": 10.0},
        baseline_avg_bits={"fp16": 16.0},
        eval_tokens=512,
        seq_len=64,
        measured_loss_increase=math.log(1.2),
        predicted_loss_increase=loss,
    )
    repair = Repair(
        tokens=256,
        tolerance=0.1,
        budget=4,
        evaluations=3,
        predicted_before=loss * 2,
        measured_before=0.3,
        predicted_after=loss,
        measured_after=0.2,
        changed=True,
        groups="unit",
        groups_measured=2,
        rounds=[],
        wall_time_s=1.0,
    )
    good = alloc.with_measured(measured).with_repair(repair).to_json()
    Allocation.load(_write(tmp_path, good))
    for field, section, value, match in [
        ("measured", "measured_loss_increase", 0.5, "measured_loss_increase"),
        ("measured", "predicted_loss_increase", loss * 3, "predicted_loss_increase"),
        ("measured", "perplexity", -1.0, "perplexity is -1"),
        ("repair", "predicted_after", loss * 3, "predicted_after"),
    ]:
        doc = json.loads(json.dumps(good))
        doc[field][section] = value
        with pytest.raises(BitallocError, match=match):
            Allocation.load(_write(tmp_path, doc))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "holds a JSON array, not an object"),
        ('{"units": [], "formats": ["fp16"], "loss": []}', "is a profile, not an allocation"),
        ('{"format": "bitalloc.problem", "objective": []}', "is a solver problem file"),
        ('{"avg_bits": NaN}', "NaN is not a JSON number"),
    ],
)
def test_files_that_are_not_allocations_are_named(tmp_path, content, match):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(BitallocError, match=match):
        Allocation.load(path)


def test_a_budget_below_the_achieved_bits_cannot_be_built(tiny_model):
    units = discover_units(tiny_model)
    with pytest.raises(BitallocError, match="over its budget of 4"):
        Allocation.from_choices(
            model="tiny", budget=4.0, units=[UnitChoice.of(u, parse_format("fp16")) for u in units]
        )


def test_a_version_1_file_loads_with_its_budget_as_the_bits_bound(tmp_path, tiny_model):
    # Version 1 recorded one number: the bound on the weights' average bits.
    doc = _solved(tiny_model).to_json()
    doc.update(version=1, budget=doc["budget"]["avg_bits"])
    doc.pop("config", None)
    loaded = Allocation.load(_write(tmp_path, doc))
    assert loaded.data.budget.avg_bits == doc["budget"]
    assert loaded.data.budget.max_bytes is None and loaded.data.version == 1
    doc["budget"] = loaded.avg_bits * 0.9
    with pytest.raises(BitallocError, match="over its budget"):
        Allocation.load(_write(tmp_path, doc))
