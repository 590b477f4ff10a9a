"""Allocating over llama.cpp types: today the palette's types must fit every unit (the
per-unit allowed mask of issue 19 is not built yet), and a type that does not fit is refused
before anything is profiled."""

from __future__ import annotations

import pytest
import torch

from bitalloc import allocate
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.models import get_linear
from tests.conftest import make_tiny_llama


def _allocate(text_files, byte_tokenizer, formats, budget, **kw):
    cal, ev = text_files
    return allocate(
        make_tiny_llama(),
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


def test_gguf_types_that_fit_every_unit_go_through_the_whole_path(text_files, byte_tokenizer):
    alloc = _allocate(text_files, byte_tokenizer, "gguf:Q4_0,gguf:Q5_1,gguf:Q8_0", 6.0, verify=True)
    assert set(alloc.formats.values()) <= {"gguf:Q4_0", "gguf:Q5_1", "gguf:Q8_0"}
    assert alloc.avg_bits <= 6.0 + 1e-9 and alloc.measured is not None
    # The recorded importance is llama.cpp's imatrix for every unit's quantization.
    model = make_tiny_llama()
    applied = alloc.apply(model)
    importance = alloc.importance()
    for name, fmt in alloc.formats.items():
        w = get_linear(model, name).weight
        expected = parse_format(fmt).fake_quantize(w, importance.of(name))
        assert torch.equal(get_linear(applied, name).weight, expected), name


def test_a_type_that_does_not_fit_a_unit_is_refused_before_profiling(
    text_files, byte_tokenizer, isolated_cache
):
    # The tiny model's inputs are 64 and 96 wide: no 256-block type fits them.
    with pytest.raises(BitallocError, match="blocks of 256.*input width of 64"):
        _allocate(text_files, byte_tokenizer, "gguf:Q4_K,gguf:Q4_0", 4.6)
    assert not (isolated_cache / "profiles").exists()
