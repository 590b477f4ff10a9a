"""GGUF export: the file transformers and libgguf read back holds each unit in its allocated type,
with the weights bitalloc measured; bad inputs are refused with nothing written."""

from __future__ import annotations

import math

import gguf
import pytest
import torch

from bitalloc.allocation import Allocation
from bitalloc.errors import BitallocError
from bitalloc.export import export_allocation
from bitalloc.export.gguf import convention_type, export_gguf, llama_permute
from bitalloc.formats import GGUFFormat
from bitalloc.models import load_model
from tests.allocations import cycling_allocation
from tests.export.tiny_gguf import bpe_tokenizer, write_tiny_gguf

MIX = ["gguf:Q4_K", "gguf:IQ4_NL", "gguf:Q2_K", "gguf:Q8_0", "gguf:F16", "gguf:IQ3_S"]


@pytest.fixture(scope="module")
def _tiny_gguf(tmp_path_factory):
    # Written and loaded once per module (loading a GGUF caches it as safetensors: seconds);
    # tests only read the model (exports and apply() work on copies).
    root = tmp_path_factory.mktemp("tiny-gguf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITALLOC_CACHE_DIR", str(root / "cache"))
        path = write_tiny_gguf(root / "tiny.gguf")
        return path, load_model(str(path))


@pytest.fixture
def tiny_gguf(_tiny_gguf, isolated_cache):
    return _tiny_gguf


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )


def test_exported_units_are_the_allocated_types_and_the_measured_weights(tiny_gguf, tmp_path):
    source, loaded = tiny_gguf
    alloc = cycling_allocation(loaded.model, MIX)
    report = export_gguf(alloc, loaded.model, source, tmp_path / "out" / "m.gguf", progress=False)
    assert report.unit_bytes * 8 == alloc.data.total_bits
    assert report.file_bytes == (tmp_path / "out" / "m.gguf").stat().st_size
    reader = gguf.GGUFReader(report.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {f"blk.{u.name.split('.')[2]}": None for u in alloc.data.units}
    assert expected  # the units are in blocks
    by_unit = {t.unit: t for t in report.tensors if t.unit is not None}
    for unit in alloc.data.units:
        assert types[by_unit[unit.name].name] == unit.format.removeprefix("gguf:")
    # Outside the allocation: llama.cpp's convention (the tied embedding is the output head).
    assert types["token_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    # transformers reads every unit back as the weight bitalloc measured, bit for bit.
    reloaded = dict(_reload(report.path).named_parameters())
    measured = alloc.apply(loaded.model, progress=False)
    for unit in alloc.data.units:
        got = reloaded[f"{unit.name}.weight"]
        assert torch.equal(got, measured.get_submodule(unit.name).weight), unit.name
    # libgguf (llama.cpp's own dequantization) reads each unit's bytes back as the same weight,
    # in llama.cpp's row order.
    stored = {t.name: t for t in reader.tensors}
    for unit in alloc.data.units:
        tensor = stored[by_unit[unit.name].name]
        weight = measured.get_submodule(unit.name).weight.detach()
        if unit.role in ("q", "k"):
            weight = llama_permute(weight, 4 if unit.role == "q" else 2)
        fmt = GGUFFormat(unit.format.removeprefix("gguf:"))
        assert torch.equal(fmt.dequantize_bytes(tensor.data.tobytes(), unit.shape), weight)
    # The metadata and tokenizer came from the source.
    assert reader.fields["general.name"].contents() == "tiny"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 300


def test_llama_permute_is_the_layout_llama_cpp_stores(tiny_gguf):
    source, loaded = tiny_gguf
    reader = gguf.GGUFReader(source)
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    attn = loaded.model.model.layers[1].self_attn
    assert torch.equal(llama_permute(attn.q_proj.weight.detach(), 4), stored["blk.1.attn_q.weight"])
    assert torch.equal(llama_permute(attn.k_proj.weight.detach(), 2), stored["blk.1.attn_k.weight"])
    assert not torch.equal(attn.q_proj.weight.detach(), stored["blk.1.attn_q.weight"])


def test_the_exported_file_measures_the_allocation_perplexity(tiny_gguf, tmp_path):
    from bitalloc.evaluate import perplexity

    source, loaded = tiny_gguf
    alloc = cycling_allocation(loaded.model, ["gguf:Q4_K", "gguf:IQ4_XS"])
    out = export_gguf(alloc, loaded.model, source, tmp_path / "m.gguf", progress=False).path
    windows = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    measured = perplexity(alloc.apply(loaded.model, progress=False), windows).perplexity
    exported = perplexity(_reload(out), windows).perplexity
    # Only the embedding differs (Q6_K in the file, float in bitalloc's measurement).
    assert math.isfinite(exported) and abs(exported / measured - 1) < 0.005


def test_a_quantized_source_is_copied_where_it_can_be_and_warned_about(tmp_path, isolated_cache):
    source = write_tiny_gguf(tmp_path / "q.gguf", weight_type="Q8_0")
    loaded = load_model(str(source))
    alloc = cycling_allocation(loaded.model, ["gguf:Q4_K"])
    report = export_gguf(alloc, loaded.model, source, tmp_path / "m.gguf", progress=False)
    assert any("Q8_0" in w for w in report.warnings)
    # An allocation for the gguf target records the source's types and warns before export.
    from bitalloc.targets import source_unit_types

    types = source_unit_types(str(source), loaded.model, alloc.data.units)
    assert set(types.values()) == {"Q8_0"} and len(types) == len(alloc.data.units)
    assert "Q8_0" in alloc.with_target("gguf", (), types).warnings()[0]
    # The embedding's convention type is Q6_K here, so it is quantized from the Q8_0 values.
    assert dict((t.name, t.type) for t in report.tensors)["token_embd.weight"] == "Q6_K"


def test_cli_allocates_for_gguf_within_a_file_size_and_exports(
    tiny_gguf, tmp_path, capsys, text_files
):
    from bitalloc.cli import main

    source, _ = tiny_gguf
    alloc_path, out = tmp_path / "a.json", tmp_path / "m.gguf"
    common = ["--calibration-tokens", "256", "--seq-len", "64", "--quiet"]
    common += ["--calibration", str(text_files[0]), "--evaluation", str(text_files[1])]
    args = ["allocate", "--model", str(source), "--target", "gguf", "--file-size", "0.62MiB"]
    formats = ["--formats", "gguf:Q2_K,gguf:Q4_K,gguf:Q8_0"]
    assert main([*args, *formats, *common, "--out", str(alloc_path)]) == 0
    alloc = Allocation.load(alloc_path)
    assert alloc.data.target == "gguf" and alloc.data.budget.max_file_bytes == 0.62 * 2**20
    assert {p.type for p in alloc.data.excluded} == {"Q6_K", "F32"}
    assert main(["export", str(alloc_path), "--out", str(out), "--quiet"]) == 0
    assert "read back" in capsys.readouterr().out
    assert out.stat().st_size <= 0.62 * 2**20
    # An existing output is refused without --force, and kept as it was.
    before = out.read_bytes()
    assert main(["export", str(alloc_path), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(alloc_path), "--out", str(out), "--force", "--quiet"]) == 0
    # A file size below what the tensors outside the allocation take names the reachable range.
    small = [*args[:-1], "0.1MiB", *formats, *common]
    assert main(small) == 2
    assert "reachable file sizes are" in capsys.readouterr().err


def test_bad_exports_are_refused_with_nothing_written(tiny_gguf, tmp_path):
    source, loaded = tiny_gguf
    out = tmp_path / "m.gguf"
    with pytest.raises(BitallocError, match="not a llama.cpp type.*--target gguf"):
        export_gguf(cycling_allocation(loaded.model, ["int4-g128"]), loaded.model, source, out)
    other = load_model(str(write_tiny_gguf(tmp_path / "other.gguf", hidden=512)))
    with pytest.raises(BitallocError, match="do not exist in this model|shapes differ"):
        export_gguf(cycling_allocation(other.model, ["gguf:Q4_K"]), loaded.model, source, out)
    gpt2 = tmp_path / "gpt2.gguf"
    gpt2.write_bytes(source.read_bytes().replace(b"llama", b"gpt2\0", 1))
    with pytest.raises(BitallocError):
        export_gguf(cycling_allocation(loaded.model, ["gguf:Q4_K"]), loaded.model, gpt2, out)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BitallocError, match="cannot read GGUF source"):
        export_gguf(cycling_allocation(loaded.model, ["gguf:Q4_K"]), loaded.model, corrupt, out)
    with pytest.raises(BitallocError, match="neither a .gguf file nor a Hugging Face directory"):
        export_allocation(
            cycling_allocation(loaded.model, ["gguf:Q4_K"]), out, model=tmp_path / "nothing"
        )
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_convention_types_follow_llama_quantize():
    assert convention_type("output.weight", (49152, 576), has_output=True) == "Q8_0"
    assert convention_type("token_embd.weight", (49152, 576), has_output=False) == "Q8_0"
    assert convention_type("output.weight", (32000, 4096), has_output=True) == "Q6_K"
    assert convention_type("blk.0.attn_norm.weight", (576,), has_output=True) == "F32"
    assert GGUFFormat("Q6_K").nominal_bits == 6.5625


def test_an_imatrix_file_replaces_the_gathered_importance(tiny_gguf, tmp_path, capsys, text_files):
    from bitalloc.cli import main
    from bitalloc.config import AllocateConfig
    from bitalloc.imatrix import save_imatrix
    from bitalloc.stages.prepare import prepare_for

    source, loaded = tiny_gguf
    base = ["allocate", "--model", str(source), "--avg-bits", "4.5", "--quiet"]
    base += ["--calibration", str(text_files[0]), "--evaluation", str(text_files[1])]
    assert main([*base, "--imatrix", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf" in capsys.readouterr().err
    cal, ev = (str(p) for p in text_files)
    config = AllocateConfig.from_flat(avg_bits=4.5, seq_len=64, calibration=cal, evaluation=ev)
    prep = prepare_for(loaded.model, config, tokenizer=loaded.tokenizer)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(BitallocError, match="corrupt.gguf"):
        prepare_for(
            loaded.model, config.with_flat(imatrix=str(corrupt)), tokenizer=prep.loaded.tokenizer
        )
    path = save_imatrix(prep.importance, prep.model, prep.units, tmp_path / "imatrix.gguf")
    read = prepare_for(
        loaded.model, config.with_flat(imatrix=str(path)), tokenizer=loaded.tokenizer
    ).importance
    for unit in prep.units:
        assert torch.equal(read.of(unit.name), prep.importance.of(unit.name))


def test_a_hugging_face_llama_is_converted_and_reads_back(tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_llama
    from tests.families import VOCAB, qwen2

    model, tokenizer = make_tiny_llama(vocab=VOCAB), bpe_tokenizer()
    alloc = cycling_allocation(model, ["gguf:Q4_0", "gguf:IQ4_NL", "gguf:Q8_0"])
    out = tmp_path / "m.gguf"
    report = export_gguf(alloc, model, None, out, tokenizer=tokenizer, progress=False)
    assert report.unit_bytes * 8 == alloc.data.total_bits
    reloaded = dict(_reload(out).named_parameters())
    measured = alloc.apply(model, progress=False)
    for unit in alloc.data.units:
        got = reloaded[f"{unit.name}.weight"]
        assert torch.equal(got, measured.get_submodule(unit.name).weight), unit.name
    text = "héllo, wörld 123 the then"
    read = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert read(text)["input_ids"] == tokenizer(text)["input_ids"]
    fields = gguf.GGUFReader(out).fields
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    other, other_tokenizer = qwen2()
    with pytest.raises(BitallocError, match="convert_hf_to_gguf"):
        export_gguf(
            cycling_allocation(other, ["gguf:Q8_0"]),
            other,
            None,
            tmp_path / "q.gguf",
            tokenizer=other_tokenizer,
        )


def test_a_qwen2_gguf_source_exports_without_the_llama_permutation(tmp_path, isolated_cache):
    source = write_tiny_gguf(tmp_path / "qwen2.gguf", arch="qwen2")
    loaded = load_model(str(source))
    alloc = cycling_allocation(loaded.model, ["gguf:Q4_K", "gguf:Q8_0"])
    report = export_gguf(alloc, loaded.model, source, tmp_path / "m.gguf", progress=False)
    reloaded = dict(_reload(report.path).named_parameters())
    measured = alloc.apply(loaded.model, progress=False)
    for unit in alloc.data.units:
        got = reloaded[f"{unit.name}.weight"]
        assert torch.equal(got, measured.get_submodule(unit.name).weight), unit.name
