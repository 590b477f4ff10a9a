"""The compressed-tensors export: a checkpoint transformers loads into the fake-quantized model,
whose tensors the package's own decompressors turn back into the allocation's weights, and
refusals that leave nothing on disk.

The tiny Llama's widths (128, 256) take every ``ct:`` scheme. Its weights are rounded to values
bfloat16 and float16 both hold exactly, so that the export's bfloat16 copy of every unquantized
tensor (and of ``fp16`` units) is the weight the fake-quantized model computes with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from safetensors import safe_open

from bitalloc.allocation import Allocation, UnitChoice
from bitalloc.errors import BitallocError
from bitalloc.export.compressed_tensors import WEIGHTS_FILE, export_compressed_tensors
from bitalloc.formats import CTFamily, CTFormat, parse_format
from bitalloc.models import discover_units, excluded_parameters
from tests.conftest import ByteTokenizer
from tests.families import BOS, EOS, PAD, VOCAB, byte_fast_tokenizer

#: One scheme per role, symmetric: transformers 5 with compressed-tensors 0.20.1 loads these
#: (its loader cannot take the -asym zero points, see test_asymmetric_schemes_load_dequantized).
BY_ROLE = {
    "q": "ct:int4-g128",
    "k": "ct:int4-g128",
    "v": "ct:int4-g128",
    "o": "ct:nvfp4",
    "gate": "ct:mxfp4",
    "up": "ct:mxfp4",
    "down": "ct:fp8-channel",
}


def tiny_llama(seed: int = 0, tied: bool = True):
    """A 2-layer Llama, hidden 128, intermediate 256, with weights exact in bfloat16 and
    float16 (rounded to bfloat16, magnitudes below float16's smallest normal zeroed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            exact = p.to(torch.bfloat16).float()
            exact[exact.abs() < 2**-14] = 0
            p.copy_(exact)
    return model


def allocation_of(model, formats: dict[str, str] | Sequence[str]) -> Allocation:
    """Unit -> format by role (a dict) or cycling through a list in network order."""
    units = discover_units(model)
    choices = []
    for i, unit in enumerate(units):
        name = formats[unit.role] if isinstance(formats, dict) else formats[i % len(formats)]
        choices.append(UnitChoice.of(unit, parse_format(name)))
    return Allocation.from_choices(
        model="tiny-llama",
        budget=None,
        units=choices,
        excluded=excluded_parameters(model, units),
    )


def reference(allocation: Allocation, model) -> torch.nn.Module:
    """The fake-quantized model with its parameters in bfloat16 (buffers, the rotary
    frequencies, stay float32 as transformers keeps them)."""
    quantized = allocation.apply(model, progress=False)
    for p in quantized.parameters():
        p.data = p.data.to(torch.bfloat16)
    return quantized


def stored(path, unit: str) -> dict[str, torch.Tensor]:
    """The tensors the file holds for ``unit``, by local name (bias left out)."""
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
        prefix = f"{unit}."
        return {
            name[len(prefix) :]: handle.get_tensor(name)
            for name in handle.keys()  # noqa: SIM118 - safe_open has no __iter__
            if name.startswith(prefix) and not name.endswith(".bias")
        }


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_fast_tokenizer(bos="<bos>")


# --- what transformers loads -------------------------------------------------------------------
def test_transformers_loads_the_export_as_the_fake_quantized_model(model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    qkv = "ct:int8-g64"
    formats = {**BY_ROLE, "q": qkv, "k": qkv, "v": qkv, "gate": "fp16", "up": "fp16"}
    alloc = allocation_of(model, formats)
    out = tmp_path / "ct"
    report = export_compressed_tensors(alloc, model, tokenizer, out, progress=False)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        WEIGHTS_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # The report: every unit's bytes are the allocation's, and the file's size is reported.
    assert report.format == "compressed-tensors" and report.path == out
    assert report.unit_bytes * 8 == alloc.data.total_bits
    assert report.file_bytes == (out / WEIGHTS_FILE).stat().st_size
    assert report.warnings == ()
    assert {t.unit for t in report.tensors} - {None} == set(alloc.formats)
    assert not any(t.name == "lm_head.weight" for t in report.tensors)  # tied: stored once
    assert {t.type for t in report.tensors if t.unit is None} == {"bfloat16"}

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["quantization_status"] == "compressed"
    assert quant["format"] == "mixed-precision"
    groups = {g["format"]: g for g in quant["config_groups"].values()}
    assert set(groups) == {"pack-quantized", "nvfp4-pack-quantized", "naive-quantized"}
    assert groups["pack-quantized"]["targets"] == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"
    ]
    assert groups["pack-quantized"]["weights"]["group_size"] == 64
    assert groups["pack-quantized"]["input_activations"] is None
    assert quant["ignore"] == [
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")
    ] + ["lm_head"]

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    expected = reference(alloc, model)
    # The first forward decompresses the layers (compressed-tensors' hook).
    with torch.no_grad():
        logits, want = loaded(ids()).logits, expected(ids()).logits
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
    for unit in alloc.formats:
        got, want = loaded.get_submodule(unit).weight, expected.get_submodule(unit).weight
        assert torch.equal(got, want), unit

    again = AutoTokenizer.from_pretrained(out)
    assert again("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_an_untied_head_is_kept_in_bfloat16(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=1, tied=False)
    alloc = allocation_of(model, BY_ROLE)
    report = export_compressed_tensors(alloc, model, tokenizer, tmp_path / "ct", progress=False)
    head = [t for t in report.tensors if t.name == "lm_head.weight"]
    assert head and head[0].type == "bfloat16" and head[0].unit is None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        logits, want = loaded(ids()).logits, reference(alloc, model)(ids()).logits
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_asymmetric_schemes_load_dequantized(model, tokenizer, tmp_path):
    """transformers 5.24's compressed load of -asym schemes fails: compressed-tensors 0.20.1
    lays out the zero points unpacked before loading, while its compressor (and vLLM) store
    them packed. Its dequantizing load takes them, with one scheme per checkpoint."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    alloc = allocation_of(model, ["ct:int4-g128-asym", "fp16"])
    export_compressed_tensors(alloc, model, tokenizer, tmp_path / "ct", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    expected = reference(alloc, model)
    for unit in alloc.formats:
        assert torch.equal(loaded.get_submodule(unit).weight, expected.get_submodule(unit).weight)


# --- what the file stores ----------------------------------------------------------------------
def test_the_packages_decompressors_give_back_every_units_weight(model, tokenizer, tmp_path):
    from compressed_tensors.compressors import BaseCompressor

    members = [f.name for f in CTFamily().members()]
    alloc = allocation_of(model, [*members, "fp16"])
    assert set(alloc.formats.values()) >= set(members[:14])
    out = tmp_path / "ct"
    report = export_compressed_tensors(alloc, model, tokenizer, out, progress=False)
    # Fused groups mix schemes here: vLLM would refuse the checkpoint, and the report says so.
    assert len(report.warnings) == 1 and "--tie qkv,gateup" in report.warnings[0]
    for u in alloc.data.units:
        fmt = parse_format(u.format)
        tensors = stored(out, u.name)
        weight = model.get_submodule(u.name).weight
        if not isinstance(fmt, CTFormat):
            assert tensors["weight"].dtype == torch.bfloat16
            assert torch.equal(tensors["weight"].float(), weight)
            continue
        layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        assert layout == fmt.layout(u.shape), u.name
        assert sum(t.nbytes for t in tensors.values()) * 8 == fmt.storage_bits(u.shape)
        compressor = BaseCompressor.get_value_from_registry(fmt.compression_format)
        state = compressor.decompress(tensors, fmt.quantization_scheme([u.name]))
        assert torch.equal(state["weight"].float(), fmt.fake_quantize(weight)), u.name


def test_fused_nvfp4_units_share_one_global_scale(model, tokenizer, tmp_path):
    alloc = allocation_of(model, {**BY_ROLE, "q": "ct:nvfp4", "k": "ct:nvfp4", "v": "ct:nvfp4"})
    out = tmp_path / "ct"
    report = export_compressed_tensors(alloc, model, tokenizer, out, progress=False)
    assert len(report.warnings) == 1 and "2 fused groups of ct:nvfp4" in report.warnings[0]
    fmt = CTFormat("nvfp4")
    for layer in (0, 1):
        names = [f"model.layers.{layer}.self_attn.{p}_proj" for p in "qkv"]
        weights = [model.get_submodule(n).weight for n in names]
        least = min(fmt.global_scale(w).item() for w in weights)
        for name, w in zip(names, weights):
            tensors = stored(out, name)
            assert tensors["weight_global_scale"].item() == least
            again = fmt.decompress(tensors)
            assert (again - w).square().mean() < 2 * (fmt.fake_quantize(w) - w).square().mean()
    # o_proj is alone in its group: its own scale, its fake-quantized weight exactly.
    o_proj = "model.layers.0.self_attn.o_proj"
    w = model.get_submodule(o_proj).weight
    assert torch.equal(fmt.decompress(stored(out, o_proj)), fmt.fake_quantize(w))


# --- refusals ----------------------------------------------------------------------------------
def test_bad_inputs_are_refused_and_leave_nothing_on_disk(model, tokenizer, tmp_path):
    alloc = allocation_of(model, BY_ROLE)
    out = tmp_path / "ct"

    def export(allocation, **kwargs):
        return export_compressed_tensors(
            allocation, kwargs.pop("model", model), tokenizer, out, progress=False, **kwargs
        )

    for formats, unit in (
        ({**BY_ROLE, "down": "gguf:Q4_K"}, "mlp.down_proj"),
        ({**BY_ROLE, "q": "int4-g128"}, "self_attn.q_proj"),
    ):
        with pytest.raises(BitallocError, match=rf"model.layers.0.{unit}.*--target ct"):
            export(allocation_of(model, formats))
    with pytest.raises(BitallocError, match="every unit of the allocation is fp16"):
        export(allocation_of(model, ["fp16"]))
    with pytest.raises(BitallocError, match="ByteTokenizer.*has no save_pretrained"):
        export_compressed_tensors(alloc, model, ByteTokenizer(), out, progress=False)
    other = tiny_llama()
    other.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 128, bias=False)
    with pytest.raises(BitallocError, match="unit shapes differ"):
        export(alloc, model=other)
    assert list(tmp_path.iterdir()) == []

    # An existing directory is kept unless forced; forced, it is replaced whole.
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(BitallocError, match="exists; pass --force"):
        export(alloc)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    export(alloc, force=True)
    assert not (out / "old.txt").exists() and (out / WEIGHTS_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]


def test_a_file_that_does_not_read_back_as_planned_is_refused(
    model, tokenizer, tmp_path, monkeypatch
):
    import bitalloc.export.compressed_tensors as ct_export

    real = ct_export._write_weights

    def drop_a_scale(tensors, path):
        tensors = dict(tensors)
        del tensors["model.layers.1.mlp.down_proj.weight_scale"]
        real(tensors, path)

    monkeypatch.setattr(ct_export, "_write_weights", drop_a_scale)
    with pytest.raises(BitallocError, match=r"export check failed: unit model.layers.1.mlp.down"):
        export_compressed_tensors(
            allocation_of(model, BY_ROLE), model, tokenizer, tmp_path / "ct", progress=False
        )
    assert list(tmp_path.iterdir()) == []
