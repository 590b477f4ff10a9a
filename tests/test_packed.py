import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import Float16Linear, QuantLinear
from bitalloc.packed import (
    MANIFEST,
    WEIGHTS,
    choose_cpu_paths,
    last_paths,
    load_packed,
    model_bytes,
    pack_model,
    packed_layers,
    save_packed,
    unit_bytes,
)
from tests.allocations import cycling_allocation

FORMATS = ("int2-g32", "int3-g64", "int4-g32", "int5-g32", "int6-g64", "int8-g32", "fp16")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_packed_units_take_exactly_the_predicted_bytes(tiny_model):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = alloc.apply(tiny_model, packed=True)
    layers = packed_layers(packed)
    assert list(layers) == [u.name for u in alloc.data.units]
    for u in alloc.data.units:
        layer = layers[u.name]
        assert layer.format.name == u.format
        assert isinstance(layer, Float16Linear if u.format == "fp16" else QuantLinear)
    # 64 and 96 inputs are multiples of 32, so every plane row fills its words.
    assert unit_bytes(packed) * 8 == alloc.data.total_bits
    sizes = model_bytes(packed)
    assert sizes["units"] + sizes["other"] == sizes["total"]
    # The tied embedding / lm_head counts once, with the norms and the rotary buffer, in "other".
    rotary = sum(b.numel() * b.element_size() for n, b in packed.named_buffers() if "rotary" in n)
    assert sizes["other"] == 4 * sum(e.numel for e in alloc.data.excluded) + rotary
    # The original model is untouched.
    assert not packed_layers(tiny_model)


def test_packed_model_computes_the_fake_quantized_model(tiny_model, ids):
    alloc = cycling_allocation(tiny_model, FORMATS)
    reference = _logits(alloc.apply(tiny_model), ids)
    exact = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    assert _rel(_logits(exact, ids), reference) < 1e-5
    assert last_paths(exact) == {"fp16-as-float32": 2, cpu.UNPACK_MATMUL: 12}

    tokens = exact.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = alloc.apply(tiny_model).generate(
        ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert tokens.shape == (1, 14) and torch.equal(tokens, expected)


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
def test_cpu_path_choice(tiny_model, ids):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.INT4PACK)
    choice = choose_cpu_paths(packed, cpu.INT4PACK)
    for name, path in choice.paths.items():
        fmt = alloc.formats[name]
        expected = {"int4-g32": cpu.INT4PACK, "fp16": "fp16"}.get(fmt, cpu.UNPACK_MATMUL)
        assert path == expected, (name, fmt)
    assert not choice.timings  # a forced path is not measured
    reference = _logits(alloc.apply(tiny_model), ids)
    assert _rel(_logits(packed, ids), reference) < cpu.DEFAULT_TOLERANCE
    assert last_paths(packed)[cpu.INT4PACK] == 2

    auto = choose_cpu_paths(packed, "auto", repeats=2)
    int4 = [layer for layer in packed_layers(packed).values() if layer.format.name == "int4-g32"]
    assert set(auto.timings) == {f"int4-g32 {q.shape[0]}x{q.shape[1]}" for q in int4}
    for timings in auto.timings.values():
        assert {t.path for t in timings} == set(cpu.CPU_PATHS)
        best = min((t for t in timings if t.correct), key=lambda t: t.total_s)
        assert best.path in auto.paths.values()
    assert auto.counts()["fp16"] == 2 and sum(auto.counts().values()) == 14
    assert all(packed_layers(packed)[n].cpu_path == p for n, p in auto.paths.items() if p != "fp16")


def test_save_and_load_without_the_original_weights(tmp_path, tiny_model, ids):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    out = save_packed(packed, tmp_path / "packed", allocation=alloc)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bitalloc_packed.json", "config.json", "generation_config.json", WEIGHTS]
    with safe_open(out / WEIGHTS, "pt") as f:
        keys = set(f.keys())
    int_units = [u.name for u in alloc.data.units if u.format != "fp16"]
    assert all(f"{u}.qweight" in keys and f"{u}.weight" not in keys for u in int_units)
    assert "lm_head.weight" not in keys  # tied to the embedding: stored once

    loaded = load_packed(out, cpu_path=cpu.UNPACK_MATMUL)
    assert torch.equal(_logits(loaded.model, ids), _logits(packed, ids))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.manifest.allocation == alloc.to_json()
    assert loaded.manifest.unit_bytes == loaded.manifest.predicted_unit_bytes == unit_bytes(packed)
    assert loaded.tokenizer is None
    # Saving again over a packed model replaces it.
    save_packed(loaded.model, out)
    assert load_packed(out, cpu_path=cpu.UNPACK_MATMUL).manifest.allocation is None


def _saved(tmp_path, tiny_model):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    return save_packed(packed, tmp_path / "packed", allocation=alloc), packed


def _sign(data):
    """The manifest's own checksum, as documented: SHA-256 of the canonical JSON of the rest."""
    rest = {k: v for k, v in data.items() if k != "manifest_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    data["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()


def _edit_manifest(directory, edit, sign=True):
    """Edit the manifest; ``sign`` recomputes its checksum so that the checks behind it run."""
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    if sign:
        _sign(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda d: d["units"]["model.layers.0.self_attn.q_proj"].update(format="int3-g32"),
            "does not match its manifest",
        ),
        (
            lambda d: d["units"]["model.layers.0.self_attn.q_proj"].update(format="int7-g32"),
            "unsupported code width 7",
        ),
        (
            lambda d: d["units"]["model.layers.0.mlp.down_proj"].update(shape=[64, 128]),
            r"\(64, 128\) in the manifest but \(64, 96\) in config.json",
        ),
        (
            lambda d: d["units"]["model.layers.0.self_attn.q_proj"].update(bias=True),
            "lacks model.layers.0.self_attn.q_proj.bias",
        ),
        (lambda d: d.update(extra=1), "malformed at extra"),
        (lambda d: d.update(planes={"3": [3]}), "another bit-plane layout"),
        (
            lambda d: d["units"].update({"model.norm": {"format": "int4-g32", "shape": [64, 64]}}),
            "not a Linear layer",
        ),
    ],
)
def test_manifest_that_does_not_match_its_tensors_raises(tmp_path, tiny_model, edit, match):
    out, _ = _saved(tmp_path, tiny_model)
    _edit_manifest(out, edit)
    with pytest.raises(BitallocError, match=match):
        load_packed(out)


def test_damaged_or_missing_files_raise(tmp_path, tiny_model):
    out, _ = _saved(tmp_path, tiny_model)
    blob = bytearray((out / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(BitallocError, match="SHA-256 differs"):
        load_packed(out)
    (out / WEIGHTS).unlink()
    with pytest.raises(BitallocError, match=f"no {WEIGHTS}"):
        load_packed(out)
    (out / MANIFEST).unlink()
    with pytest.raises(BitallocError, match="holds no packed model"):
        load_packed(out)
    with pytest.raises(BitallocError, match="unknown CPU path"):
        load_packed(out, cpu_path="gpu")


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, tiny_model, monkeypatch):
    import bitalloc.packed as packed_module

    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(packed_module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_packed(packed, tmp_path / "new")
    with pytest.raises(BitallocError, match="holds no packed model"):
        load_packed(tmp_path / "new")
    monkeypatch.undo()

    # Over an existing packed model: the old manifest no longer matches the new weights.
    out = save_packed(packed, tmp_path / "old")
    other = pack_model(tiny_model, cycling_allocation(tiny_model, ("int3-g32",)).formats)
    monkeypatch.setattr(packed_module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_packed(other, out)
    monkeypatch.undo()
    with pytest.raises(BitallocError, match="save was interrupted"):
        load_packed(out)


def test_bad_targets_and_models_raise(tmp_path, tiny_model):
    alloc = cycling_allocation(tiny_model, FORMATS)
    packed = pack_model(tiny_model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BitallocError, match="not empty and holds no packed model"):
        save_packed(packed, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(BitallocError, match="no packed units"):
        save_packed(tiny_model, tmp_path / "plain")
    with pytest.raises(BitallocError, match="Hugging Face model"):
        save_packed(
            nn.Sequential(packed_layers(packed)["model.layers.0.mlp.up_proj"]), tmp_path / "x"
        )
    with pytest.raises(BitallocError, match="does not exist in this model"):
        pack_model(tiny_model, {"model.layers.9.mlp.up_proj": "int4-g32"})
    with pytest.raises(BitallocError, match="unknown CPU path"):
        pack_model(tiny_model, alloc.formats, cpu_path="fastest")
    with pytest.raises(BitallocError, match="unknown format"):
        pack_model(tiny_model, {"model.layers.0.mlp.up_proj": "int7"})
    assert not packed_layers(tiny_model)


def test_unsigned_manifest_edits_are_refused_and_reformatting_is_not(tmp_path, tiny_model, ids):
    out, packed = _saved(tmp_path, tiny_model)
    path = out / MANIFEST
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data, indent=4, sort_keys=True))  # same content, other text
    loaded = load_packed(out, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    assert torch.equal(_logits(loaded.model, ids), _logits(packed, ids))
    # Fields no tensor could contradict are covered by the manifest's own checksum.
    for edit in (
        lambda d: d["allocation"].update(solver="edited"),
        lambda d: d.update(predicted_unit_bytes=d["predicted_unit_bytes"] + 1),
        lambda d: d.update(manifest_sha256="0" * 64),
    ):
        _edit_manifest(out, edit, sign=False)
        with pytest.raises(BitallocError, match="modified after it was written"):
            load_packed(out, progress=False)
        path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(unit_bytes=d["unit_bytes"] + 2), "the manifest records"),
        (lambda d: d.update(model_class="GPT2LMHeadModel"), "written for a GPT2LMHeadModel"),
        (lambda d: d.update(config_sha256="0" * 64), r"config.json is not the file"),
        (lambda d: d.pop("config_sha256"), "lacks its checksums"),
        (lambda d: d.update(tied={"lm_head.weight": "model.norm.weight"}), "do not allow"),
        (lambda d: d.update(tied={}), "lacks 'lm_head.weight'"),
    ],
)
def test_signed_manifest_that_contradicts_the_files_raises(tmp_path, tiny_model, edit, match):
    out, _ = _saved(tmp_path, tiny_model)
    _edit_manifest(out, edit)
    with pytest.raises(BitallocError, match=match):
        load_packed(out, progress=False)


def test_a_stored_bias_the_manifest_omits_is_refused(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(attention_bias=True)
    name = "model.layers.0.self_attn.q_proj"
    out = save_packed(pack_model(model, {name: "int4-g32"}, progress=False), tmp_path / "p")
    _edit_manifest(out, lambda d: d["units"][name].update(bias=False))
    with pytest.raises(BitallocError, match=f"holds {name}.bias"):
        load_packed(out, progress=False)


def test_progress_bar_follows_the_flag(tiny_model, capsys):
    formats = cycling_allocation(tiny_model, ("int3-g32",)).formats
    pack_model(tiny_model, formats, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    assert capsys.readouterr().err == ""
    pack_model(tiny_model, formats, cpu_path=cpu.UNPACK_MATMUL)
    assert "packing" in capsys.readouterr().err


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
def test_paths_record_why_and_a_failed_probe_falls_back(tiny_model, monkeypatch):
    from bitalloc.kernels.int4pack import Int4PackProbe
    from bitalloc.packed import cpu_path_report

    formats = {**cycling_allocation(tiny_model, ("int3-g32", "fp16")).formats}
    int4 = "model.layers.0.mlp.up_proj"  # 96x64: int4pack takes it
    formats[int4] = "int4-g32"
    packed = pack_model(tiny_model, formats, cpu_path=cpu.INT4PACK, progress=False)
    layers = packed_layers(packed)
    assert layers[int4].cpu_path == cpu.INT4PACK
    assert layers[int4].cpu_path_reason == "int4pack was asked for"
    assert all(layer.cpu_path_reason for layer in layers.values() if hasattr(layer, "cpu_path"))
    report = cpu_path_report(packed)
    assert report.startswith("units per CPU path: fp16 ") and "int4pack 1" in report
    assert cpu.int4pack_probe().describe() in report

    failed = Int4PackProbe("TEST", None, False, "made to fail", 0.0)
    monkeypatch.setattr(cpu, "int4pack_probe", lambda: failed)
    for policy in ("auto", cpu.INT4PACK):
        choice = choose_cpu_paths(packed, policy, repeats=1, progress=False)
        assert choice.paths[int4] == cpu.UNPACK_MATMUL and "made to fail" in choice.reasons[int4]
        assert layers[int4].cpu_path_reason == choice.reasons[int4]
    assert "int4pack off on TEST: made to fail" in cpu_path_report(packed)
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        packed(x)
    assert layers[int4].last_path == cpu.UNPACK_MATMUL


SAVE_AND_LOAD = """
import sys
import torch
from bitalloc.kernels import cpu
from bitalloc.packed import last_paths, load_packed, pack_model, save_packed
from transformers import AutoModelForCausalLM

source, mine, theirs, logits = sys.argv[1:5]
# The same weights, not the same seed: torch's random fill differs between capabilities.
model = AutoModelForCausalLM.from_pretrained(source)
formats = {n: "int4-g32" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
formats.pop("lm_head")
save_packed(pack_model(model, formats, cpu_path="int4pack", progress=False), mine)
if theirs != "-":
    loaded = load_packed(theirs, cpu_path="int4pack", progress=False).model
    with torch.no_grad():
        out = loaded(torch.arange(24).reshape(2, 12)).logits
    torch.save(out, logits)
    print(torch.backends.cpu.get_cpu_capability(), last_paths(loaded).get("int4pack", 0))
"""


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
def test_files_do_not_depend_on_the_cpu_capability(tmp_path):
    """Written under one capability, byte-identical and correct on int4pack under another."""
    from tests.hfdirs import tiny_model_dir
    from tests.kernels.capabilities import CAPABILITIES, offered, run_under

    caps = [c for c in reversed(CAPABILITIES) if offered(c)]
    if len(caps) < 2:
        pytest.skip("this CPU offers torch one capability only")
    first, second = caps[0], caps[-1]
    source = str(tiny_model_dir(tmp_path / "source"))
    a = run_under(first, SAVE_AND_LOAD, source, str(tmp_path / "a"), "-", "-")
    assert a.returncode == 0, a.stderr
    b = run_under(
        second, SAVE_AND_LOAD, source, str(tmp_path / "b"), str(tmp_path / "a"), str(tmp_path / "y")
    )
    assert b.returncode == 0, b.stderr
    capability, int4_units = b.stdout.split()
    assert capability == second.upper() and int(int4_units) == 14
    for name in (WEIGHTS, MANIFEST, "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    exact = load_packed(tmp_path / "a", cpu_path=cpu.UNPACK_MATMUL, progress=False).model
    with torch.no_grad():
        reference = exact(torch.arange(24).reshape(2, 12)).logits
    assert _rel(torch.load(tmp_path / "y"), reference) < cpu.DEFAULT_TOLERANCE


# --- formats stored in an int layout: rotated (+rht) and duck-typed (GPTQ-like) --------------
ROTATED = ("int3-g32+rht", "int4-g32+rht-s5", "int3-g64+gptq+rht-s2", "int2-g32", "fp16")


@pytest.fixture
def rht_family():
    from bitalloc.formats import get_family

    return get_family("rht")


def _fake_quantized(model, formats):
    """A copy of ``model`` whose named linears hold their formats' fake-quantized weights."""
    import copy

    from bitalloc.formats import parse_format
    from bitalloc.models import get_linear

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, fmt in formats.items():
            linear = get_linear(reference, name)
            linear.weight.copy_(parse_format(fmt).fake_quantize(linear.weight))
    return reference


def test_rotated_units_compute_the_fake_quantized_model_and_survive_save_and_load(
    tmp_path, tiny_model, ids, rht_family
):
    from bitalloc.kernels.rotated import RotatedLinear
    from bitalloc.packed import packed_units

    alloc = cycling_allocation(tiny_model, ROTATED)
    # The exact path: "auto" may pick int4pack, whose bfloat16 activations miss 1e-5.
    packed = alloc.apply(tiny_model, packed=True, cpu_path=cpu.UNPACK_MATMUL)
    units = packed_units(packed)
    assert list(units) == [u.name for u in alloc.data.units]
    for name, fmt in alloc.formats.items():
        assert units[name].format.name == fmt
        assert isinstance(units[name], RotatedLinear) == ("+rht" in fmt)
    # The rotated units' inner layers are what path choice and byte counts walk.
    rotated = [n for n, f in alloc.formats.items() if "+rht" in f]
    assert {f"{n}.inner" for n in rotated} <= set(packed_layers(packed))
    # 64 and 96 inputs fill every plane word: the bytes are the base layouts' storage bits.
    assert unit_bytes(packed) * 8 == alloc.data.total_bits
    for name in rotated:
        layer = units[name]
        assert layer.nbytes * 8 == layer.format.storage_bits(layer.shape)

    reference = _logits(_fake_quantized(tiny_model, alloc.formats), ids)
    assert _rel(_logits(packed, ids), reference) < 1e-5
    assert _rel(_logits(alloc.apply(tiny_model), ids), reference) < 1e-6

    out = save_packed(packed, tmp_path / "packed", allocation=alloc)
    with safe_open(out / WEIGHTS, "pt") as f:
        keys = set(f.keys())
    assert all(f"{n}.inner.qweight" in keys and f"{n}.qweight" not in keys for n in rotated)
    loaded = load_packed(out, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    assert {n: u.format for n, u in loaded.manifest.units.items()} == alloc.formats
    assert torch.equal(_logits(loaded.model, ids), _logits(packed, ids))
    assert loaded.manifest.unit_bytes == loaded.manifest.predicted_unit_bytes == unit_bytes(packed)
    again = packed_units(loaded.model)
    assert all(isinstance(again[n], RotatedLinear) for n in rotated)
    assert again[rotated[1]].rotation.seed == 5  # rebuilt from the name

    # A manifest that drops the rotation (re-signed) cannot find the unit's tensors.
    name = rotated[0]
    _edit_manifest(out, lambda d: d["units"][name].update(format="int3-g32"))
    with pytest.raises(BitallocError, match=f"lacks {name}.qweight"):
        load_packed(out, progress=False)


def test_a_format_without_an_int_layout_is_refused_before_anything_changes(tiny_model):
    from bitalloc.formats import parse_format
    from bitalloc.formats.rotation import RotatedFormat

    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(BitallocError, match="packed kernels do not run"):
        pack_model(tiny_model, {name: RotatedFormat(parse_format("gguf:q4_0"))}, progress=False)
    with pytest.raises(BitallocError, match="packed kernels do not run"):
        pack_model(tiny_model, {name: "gguf:q4_0"}, progress=False)
    assert not packed_layers(tiny_model)


class _EmphasisFamily:
    """A test double for an error-feedback family: ``int<b>-g<g>+emph`` stores int codes (an
    ``int_format``) chosen by its own ``quantize`` (importance rising across the columns), which
    differs from the plain int quantizer; nothing but the duck-typed attributes tells the packer
    how to hold it."""

    @staticmethod
    def make():
        import re
        from dataclasses import dataclass

        from bitalloc.formats import QuantFormat, dequantize, parse_format
        from bitalloc.formats.base import Format
        from bitalloc.formats.registry import FormatFamily

        @dataclass(frozen=True)
        class EmphasisFormat(Format):
            base: QuantFormat

            name = property(lambda self: self.base.name + "+emph")
            family = "emph"
            is_float = False
            nominal_bits = property(lambda self: self.base.nominal_bits)
            int_format = property(lambda self: self.base)

            def check_shape(self, shape):
                return self.base.check_shape(shape)

            def storage_bits(self, shape):
                return self.base.storage_bits(shape)

            def quantize(self, weight, importance=None):
                emphasis = torch.linspace(1.0, 50.0, weight.shape[1]) ** 2
                return self.base.quantize(weight, emphasis)

            def fake_quantize(self, weight, importance=None):
                return dequantize(self.quantize(weight, importance)).to(weight.dtype)

        class EmphasisFamily(FormatFamily):
            name = "emph"
            description = "test only: '<int format>+emph'"
            example = "int3-g32+emph"

            def parse(self, text):
                match = re.match(r"^(int\d+-g\d+)\+emph$", text)
                return EmphasisFormat(parse_format(match.group(1))) if match else None

            def members(self):
                return (EmphasisFormat(QuantFormat(3, 32)),)

        return EmphasisFamily()


def test_a_duck_typed_int_layout_format_packs_saves_and_loads(tmp_path, tiny_model, ids):
    from bitalloc.formats import parse_format, registered_family
    from bitalloc.packed import packed_units

    with registered_family(_EmphasisFamily.make()):
        formats = cycling_allocation(
            tiny_model, ("int3-g32+emph", "int4-g64+emph+rht-s1", "int3-g32")
        ).formats
        packed = pack_model(tiny_model, formats, cpu_path=cpu.UNPACK_MATMUL, progress=False)
        units = packed_units(packed)
        for name, fmt in formats.items():
            assert units[name].format.name == fmt
            assert units[name].nbytes * 8 == parse_format(fmt).storage_bits(units[name].shape)
        # The packed codes are the format's own (not the plain int quantizer's).
        emph = next(n for n, f in formats.items() if f == "int3-g32+emph")
        plain = QuantLinear.from_linear(tiny_model.get_submodule(emph), parse_format("int3-g32"))
        assert not torch.equal(units[emph].qweight, plain.qweight)
        reference = _logits(_fake_quantized(tiny_model, formats), ids)
        assert _rel(_logits(packed, ids), reference) < 1e-5

        out = save_packed(packed, tmp_path / "packed")
        loaded = load_packed(out, cpu_path=cpu.UNPACK_MATMUL, progress=False)
        assert {n: u.format for n, u in loaded.manifest.units.items()} == formats
        assert torch.equal(_logits(loaded.model, ids), _logits(packed, ids))
    # Without the family the name no longer parses: the manifest refuses to load.
    with pytest.raises(BitallocError, match="unknown format 'int3-g32\\+emph'"):
        load_packed(out, progress=False)
