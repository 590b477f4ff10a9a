"""Allocating over llama.cpp types, whose row-length rules let a type store some units and not
others: each unit takes only the formats that can store it, everywhere a run chooses or
measures one (profiles, problems, baselines, repair, search)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc import allocate
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format, parse_palette
from bitalloc.measuring import baseline_formats
from bitalloc.models import discover_units, get_linear
from bitalloc.planning import allowed_table, feasible_avg_bits
from bitalloc.search.run import search_space
from bitalloc.sensitivity.monotone import cap_chains
from tests.conftest import make_tiny_llama

#: q/k/v/o/gate/up read 256-wide inputs (K-quants fit), down_proj 320-wide ones (they do not).
WIDE = {"hidden": 256, "intermediate": 320, "heads": 4, "kv_heads": 2, "layers": 2}
PALETTE = "gguf:Q3_K,gguf:Q4_K,gguf:Q6_K,gguf:Q4_0,gguf:Q8_0"


def _allocate(text_files, byte_tokenizer, model, formats, budget, **kw):
    cal, ev = text_files
    return allocate(
        model,
        budget,
        tokenizer=byte_tokenizer,
        calibration=str(cal),
        evaluation=str(ev),
        seq_len=32,
        formats=formats,
        calibration_tokens=128,
        progress=False,
        use_cache=False,
        **kw,
    )


@pytest.mark.parametrize("profiler", ["fisher", "measured"])
def test_each_unit_takes_only_the_types_that_fit_it(text_files, byte_tokenizer, profiler):
    model = make_tiny_llama(**WIDE)
    alloc = _allocate(
        text_files, byte_tokenizer, model, PALETTE, 4.6, verify=True, profiler=profiler
    )
    assert alloc.avg_bits <= 4.6 + 1e-9 and alloc.measured is not None
    chosen = {u.role: [] for u in alloc.data.units}
    for u in alloc.data.units:
        fmt = parse_format(u.format)
        assert fmt.allows(tuple(u.shape)), (u.name, u.format)
        chosen[u.role].append(u.format)
    assert not any(f.endswith("_K") for f in chosen["down"])
    assert any(f.endswith("_K") for role, fs in chosen.items() if role != "down" for f in fs)
    # What is applied is each type quantized with the recorded importance as its imatrix.
    applied = alloc.apply(model)
    importance = alloc.importance()
    for name, fmt in alloc.formats.items():
        w = get_linear(model, name).weight
        expected = parse_format(fmt).fake_quantize(w, importance.of(name))
        assert torch.equal(get_linear(applied, name).weight, expected), name


def test_packing_a_gguf_allocation_is_refused_with_the_projects_error():
    from bitalloc.packed import pack_model

    model = make_tiny_llama()
    name = discover_units(model)[0].name
    with pytest.raises(BitallocError, match="packed kernels do not run"):
        pack_model(model, {name: "gguf:Q4_0"}, progress=False)


def test_a_palette_that_cannot_store_a_unit_is_refused_before_profiling(
    text_files, byte_tokenizer, isolated_cache
):
    # The tiny model's inputs are 64 and 96 wide: no 256-block type fits them.
    with pytest.raises(BitallocError, match="no format of the palette can store"):
        _allocate(text_files, byte_tokenizer, make_tiny_llama(), "gguf:Q4_K,gguf:Q6_K", 5.0)
    assert not (isolated_cache / "profiles").exists()


def test_budgets_baselines_and_search_spaces_count_only_fitting_types():
    units = discover_units(make_tiny_llama(**WIDE))
    palette = parse_palette(PALETTE)
    allowed = allowed_table(units, palette)
    k_quant = np.array([f.name.endswith("_K") for f in palette])
    down = np.array([u.role == "down" for u in units])
    assert not allowed[down][:, k_quant].any() and allowed[down][:, ~k_quant].all()
    assert allowed[~down].all()
    lo, hi = feasible_avg_bits(units, palette)
    numel = sum(u.numel for u in units)
    cheapest = sum(
        min(f.storage_bits(u.shape) for f in palette if f.allows(u.shape)) for u in units
    )
    assert lo == pytest.approx(cheapest / numel) and hi == pytest.approx(8.5)
    # Uniform baselines only in types that store every unit (plus int4-g128 and fp16).
    assert {f.name for f in baseline_formats(units, palette, 4.6)} <= {
        "gguf:Q4_0",
        "gguf:Q8_0",
        "int4-g128",
        "fp16",
    }
    space = search_space(units, palette, [], space="full")
    for u in units:
        assert all(parse_format(f).allows(u.shape) for f in space[u.name])


def test_placeholders_neither_cap_nor_are_capped_on_a_ladder():
    # One ladder of three rungs; unit 0 cannot take the middle rung (placeholder 0).
    table = np.array([[0.9, 0.0, 0.5], [0.9, 0.7, 0.8]])
    allowed = np.array([[True, False, True], [True, True, True]])
    capped, fixed = cap_chains(table, [[0, 1, 2]], allowed)
    np.testing.assert_array_equal(capped, [[0.9, 0.0, 0.5], [0.9, 0.7, 0.7]])
    assert fixed == 1
    # Without the mask the placeholder would have capped unit 0's last rung to 0.
    assert cap_chains(table, [[0, 1, 2]])[0][0, 2] == 0.0
