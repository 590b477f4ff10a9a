"""A streamed packed model (``apply --stream``): the directory holds the tensors, dtypes and
manifest the in-memory ``apply`` writes for the same allocation, loads with ``load_packed``
and computes the same logits; bad inputs are refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.packed import MANIFEST, WEIGHTS, load_packed, save_packed
from bitalloc.streaming.export_packed import export_packed_streamed
from tests.families import VOCAB
from tests.streaming.checkpoints import allocate_tiny, calibration, write_tiny_checkpoint

FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"
#: Manifest fields that name the files' bytes (the config's dtype differs between loaders).
DIGESTS = ("weights_sha256", "config_sha256", "manifest_sha256")


@pytest.fixture(scope="module", params=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return write_tiny_checkpoint(path, tied=request.param == "tied")


@pytest.fixture(scope="module")
def allocation(checkpoint):
    return allocate_tiny(checkpoint, 4.5, FORMATS)


def _in_memory(allocation, checkpoint, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    packed = allocation.apply(model, packed=True, cpu_path="unpack-matmul", progress=False)
    return save_packed(
        packed, out, tokenizer=AutoTokenizer.from_pretrained(checkpoint), allocation=allocation
    )


def test_the_streamed_packed_model_is_the_in_memory_one(checkpoint, allocation, tmp_path):
    assert len(set(allocation.formats.values())) > 2
    streamed = export_packed_streamed(allocation, checkpoint, tmp_path / "s")
    whole = _in_memory(allocation, checkpoint, tmp_path / "w")
    got, want = load_file(streamed / WEIGHTS), load_file(whole / WEIGHTS)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    manifests = [json.loads((d / MANIFEST).read_text()) for d in (streamed, whole)]
    for manifest in manifests:
        for key in DIGESTS:
            manifest.pop(key)
    assert manifests[0] == manifests[1]
    assert manifests[0]["unit_bytes"] == allocation.data.total_bits // 8
    # Both load, and compute the same logits.
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    logits = []
    for directory in (streamed, whole):
        loaded = load_packed(directory, cpu_path="unpack-matmul", progress=False)
        assert loaded.tokenizer is not None
        with torch.no_grad():
            logits.append(loaded.model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_apply_stream_on_the_command_line_replaces_a_packed_model(
    checkpoint, allocation, tmp_path, capsys
):
    saved = tmp_path / "alloc.json"
    allocation.save(saved)
    out = tmp_path / "packed"
    args = ["apply", "--allocation", str(saved), "--model", str(checkpoint), "--out", str(out)]
    assert main([*args, "--stream", "--quiet"]) == 0
    assert "ratio 1.0000" in capsys.readouterr().out
    first = (out / WEIGHTS).read_bytes()
    assert main([*args, "--stream", "--quiet"]) == 0  # a packed model there is replaced
    assert (out / WEIGHTS).read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spool left
    # +gptq: the command gathers the Gram matrices from the recorded calibration text.
    gptq = allocate_tiny(checkpoint, 5.0, "int3-g32+gptq,int4-g32")
    gptq.save(saved)
    assert main([*args, "--stream", "--quiet"]) == 0
    assert load_packed(out, cpu_path="unpack-matmul", progress=False).manifest.unit_bytes == (
        gptq.data.total_bits // 8
    )


@pytest.mark.parametrize("formats", ["int3-g32+gptq,int4-g32,fp16", "int4-g32+rht,int8-g32"])
def test_gram_formats_are_packed_with_the_matrices_the_in_memory_apply_gathers(
    checkpoint, formats, tmp_path
):
    cal = calibration()
    allocation = allocate_tiny(checkpoint, 5.0, formats)
    assert allocation.uses_grams
    with pytest.raises(BitallocError, match="pass calibration="):
        export_packed_streamed(allocation, checkpoint, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    streamed = export_packed_streamed(allocation, checkpoint, tmp_path / "s", calibration=cal)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    packed = allocation.apply(
        model, packed=True, cpu_path="unpack-matmul", progress=False, calibration=cal
    )
    whole = save_packed(packed, tmp_path / "w", allocation=allocation)
    got, want = load_file(streamed / WEIGHTS), load_file(whole / WEIGHTS)
    assert sorted(got) == sorted(want)
    # The same batches through the same float32 layers: the same matrices, the same codes.
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_formats_a_stream_cannot_pack_and_a_foreign_directory_are_refused(
    checkpoint, allocation, tmp_path
):
    other = allocate_tiny(checkpoint, 6.0, "gguf:Q4_0,gguf:Q8_0")
    with pytest.raises(BitallocError, match="packed kernels do not run"):
        export_packed_streamed(other, checkpoint, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(BitallocError, match="holds no packed model"):
        export_packed_streamed(allocation, checkpoint, foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
