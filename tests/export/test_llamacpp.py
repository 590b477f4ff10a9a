"""Against llama.cpp itself: its quantize tool writes the bytes the gguf family writes (same
importance matrix), and its perplexity tool runs an exported file.

These need llama.cpp's tools built (``python -m bitalloc.export.llamacpp build``, cached outside
the repository, or ``$BITALLOC_LLAMA_CPP``); without them they are skipped with that reason.
"""

from __future__ import annotations

import math

import gguf
import pytest
import torch

from bitalloc.export.gguf import export_gguf, llama_permute
from bitalloc.export.llamacpp import find_llama_cpp, missing_reason
from bitalloc.formats import GGUFFormat
from bitalloc.imatrix import save_imatrix
from bitalloc.importance import Importance, to_bfloat16_values
from bitalloc.models import discover_units, load_model
from tests.allocations import cycling_allocation
from tests.export.tiny_gguf import write_tiny_gguf

TOOLS = find_llama_cpp()
pytestmark = pytest.mark.skipif(TOOLS is None, reason=missing_reason())


@pytest.fixture
def tiny(tmp_path, isolated_cache):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    return path, load_model(str(path))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q6_K", "IQ4_NL", "IQ3_S", "Q5_0", "IQ4_XS"])
def test_llama_quantize_writes_the_bytes_the_gguf_family_writes(tiny, tmp_path, qtype):
    source, loaded = tiny
    units = discover_units(loaded.model)
    gen = torch.Generator().manual_seed(1)
    importance = Importance(
        {u.name: to_bfloat16_values(torch.rand(u.shape[1], generator=gen) ** 3) for u in units},
        tokens=512,
    )
    imatrix = save_imatrix(importance, loaded.model, units, tmp_path / "imatrix.gguf")
    out = TOOLS.quantize(source, tmp_path / "q.gguf", qtype, imatrix=imatrix, extra=("--pure",))
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    fmt = GGUFFormat(qtype)
    for unit in units[:7]:  # one layer: q, k, v, o, gate, up, down
        layer, kind = unit.name.split(".")[2], unit.role
        name = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}.get(kind)
        name = f"blk.{layer}.{name or 'ffn_' + kind}.weight"
        weight = loaded.model.get_submodule(unit.name).weight.detach()
        if kind in ("q", "k"):
            weight = llama_permute(weight, 4 if kind == "q" else 2)
        ours = fmt.quantize_bytes(weight, importance.of(unit.name))
        assert written[name].tensor_type.name == qtype
        assert bytes(written[name].data.tobytes()) == ours, f"{qtype} {name}"


def test_llama_perplexity_runs_an_exported_file(tiny, tmp_path):
    source, loaded = tiny
    alloc = cycling_allocation(loaded.model, ["gguf:Q4_K", "gguf:IQ4_NL", "gguf:Q8_0"])
    out = export_gguf(alloc, loaded.model, source, tmp_path / "m.gguf", progress=False).path
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    ppl = TOOLS.perplexity(out, text, ctx=128, chunks=2)
    assert math.isfinite(ppl) and ppl > 1
