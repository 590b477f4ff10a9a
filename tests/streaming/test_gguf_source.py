"""A GGUF file streamed as a checkpoint: its tensors, read one at a time, equal the model
transformers loads from it (dequantized, q/k rows turned back); it allocates layer by layer;
its streamed GGUF export equals the in-memory one; a file of another architecture is refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.export.gguf import export_gguf
from bitalloc.models import load_model
from bitalloc.streaming.allocate import allocate_streamed
from bitalloc.streaming.export_gguf import export_gguf_streamed
from bitalloc.streaming.model import StreamedModel
from tests.conftest import random_windows
from tests.export.tiny_gguf import write_tiny_gguf


@pytest.mark.parametrize("weight_type", ["Q4_K", "F16"])
def test_streamed_tensors_are_the_loaded_models(tmp_path, isolated_cache, weight_type):
    source = write_tiny_gguf(tmp_path / "m.gguf", weight_type=weight_type)
    whole = dict(load_model(str(source)).model.named_parameters())
    streamed = StreamedModel(source)
    read = streamed.checkpoint.read(list(streamed.checkpoint.tensors), torch.float32)
    assert set(read) == set(whole)
    for name, value in read.items():
        assert torch.equal(value, whole[name].detach()), name
    down = streamed.checkpoint.info("model.layers.1.mlp.down_proj.weight")
    assert down.shard == "blk.1.ffn_down.weight"
    if weight_type == "Q4_K":  # stored bytes: 4.5 bits per weight
        assert down.nbytes * 8 == down.numel * 4.5


def test_a_gguf_allocates_streamed_and_exports_the_in_memory_file(tmp_path, isolated_cache):
    source = write_tiny_gguf(tmp_path / "m.gguf", weight_type="F16")
    cal = random_windows(seed=0, n=4, seq_len=32)
    alloc = allocate_streamed(
        source,
        4.5,
        formats="gguf:Q3_K,gguf:Q4_K,gguf:Q6_K,fp16",
        windows=cal,
        tokens=128,
        progress=False,
    )
    assert len(set(alloc.formats.values())) > 1
    streamed = export_gguf_streamed(alloc, source, tmp_path / "s.gguf", progress=False)
    loaded = load_model(str(source))
    whole = export_gguf(
        alloc,
        loaded.model,
        source,
        tmp_path / "w.gguf",
        tokenizer=loaded.tokenizer,
        progress=False,
    )
    assert streamed.tensors == whole.tensors and streamed.warnings == whole.warnings
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "s.gguf").tensors}
    want = {t.name: t for t in gguf.GGUFReader(tmp_path / "w.gguf").tensors}
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(got[name].data), np.asarray(tensor.data)), name
    assert (tmp_path / "s.gguf").read_bytes() == (tmp_path / "w.gguf").read_bytes()


def test_an_unsupported_gguf_architecture_is_refused(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BitallocError, match="architecture 'gpt2' is not supported"):
        StreamedModel(path)
