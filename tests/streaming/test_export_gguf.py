"""A streamed GGUF export: the file equals the one written from the model loaded whole, tensor
by tensor and key by key, whatever the row blocks the head is read in; it is written through
the command line with ``export --stream``; bad inputs are refused with nothing written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.export.gguf import export_gguf
from bitalloc.streaming.allocate import allocate_streamed
from bitalloc.streaming.export_gguf import export_gguf_streamed
from tests.conftest import make_tiny_llama, random_windows
from tests.families import VOCAB
from tests.streaming.checkpoints import allocate_tiny, write_tiny_checkpoint

FORMATS = "gguf:Q4_0,gguf:IQ4_NL,gguf:Q5_0,gguf:Q8_0"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer tiny Llama (untied head) in bf16 shards, with a byte-level BPE tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def allocation(checkpoint):
    return allocate_tiny(checkpoint, 5.0, FORMATS)


def _tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def test_the_streamed_gguf_is_the_whole_models_file(checkpoint, allocation, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitalloc.streaming.export_gguf as streamed_gguf

    assert len(set(allocation.formats.values())) > 1
    # The head and embedding (300 rows) read in blocks of 128: two full blocks and a short one.
    monkeypatch.setattr(streamed_gguf, "HEAD_ROWS", 128)
    streamed = export_gguf_streamed(allocation, checkpoint, tmp_path / "s.gguf", progress=False)
    whole_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    whole = export_gguf(
        allocation, whole_model, None, tmp_path / "w.gguf", tokenizer=tokenizer, progress=False
    )
    assert streamed.unit_bytes == whole.unit_bytes == allocation.data.total_bits // 8
    assert streamed.tensors == whole.tensors and streamed.warnings == whole.warnings
    got_reader, got = _tensors(tmp_path / "s.gguf")
    want_reader, want = _tensors(tmp_path / "w.gguf")
    assert list(got) == list(want)
    assert {"output.weight", "token_embd.weight"} <= set(got)
    for name, tensor in want.items():
        assert got[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(got[name].data), np.asarray(tensor.data)), name
    assert list(got_reader.fields) == list(want_reader.fields)
    for key, field in want_reader.fields.items():
        if key != "general.name":  # the config's path, as each loader records it
            assert got_reader.fields[key].contents() == field.contents(), key


def test_export_stream_on_the_command_line_and_bad_inputs(checkpoint, allocation, tmp_path):
    saved = tmp_path / "alloc.json"
    allocation.save(saved)
    out = tmp_path / "m.gguf"
    assert main(["export", str(saved), "--stream", "--out", str(out), "--quiet"]) == 0
    assert gguf.GGUFReader(out).tensors
    # No such model: refused with the project's error, nothing written.
    with pytest.raises(BitallocError, match="neither"):
        from bitalloc.export import export_allocation

        export_allocation(allocation, tmp_path / "n.gguf", model=tmp_path / "nope", stream=True)
    # Exists: refused, the file kept.
    before = out.read_bytes()
    assert main(["export", str(saved), "--stream", "--out", str(out), "--quiet"]) == 2
    assert out.read_bytes() == before

    with pytest.raises(BitallocError, match="not a llama.cpp type"):
        other = allocate_streamed(
            checkpoint,
            5.0,
            formats="int4-g32,fp16",
            windows=random_windows(seed=0, n=4, seq_len=32),
            tokens=128,
            progress=False,
        )
        export_gguf_streamed(other, checkpoint, tmp_path / "o.gguf")
    smaller = tmp_path / "smaller"
    model = make_tiny_llama(layers=2, hidden=32, vocab=VOCAB, tie_word_embeddings=False)
    model.save_pretrained(smaller)
    with pytest.raises(BitallocError, match="made for another model"):
        export_gguf_streamed(allocation, smaller, tmp_path / "x.gguf")
    bare = tmp_path / "bare"
    make_tiny_llama(layers=2, vocab=VOCAB, tie_word_embeddings=False).save_pretrained(bare)
    with pytest.raises(BitallocError, match="no usable tokenizer"):
        export_gguf_streamed(allocation, bare, tmp_path / "y.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "alloc.json",
        "bare",
        "m.gguf",
        "smaller",
    ]


@pytest.mark.xdist_group("ray")
def test_ray_workers_quantize_the_same_file(checkpoint, allocation, tmp_path):
    pytest.importorskip("ray")
    here = export_gguf_streamed(allocation, checkpoint, tmp_path / "here.gguf", progress=False)
    there = export_gguf_streamed(
        allocation, checkpoint, tmp_path / "ray.gguf", progress=False, workers=2
    )
    assert there.tensors == here.tensors
    assert (tmp_path / "ray.gguf").read_bytes() == (tmp_path / "here.gguf").read_bytes()
