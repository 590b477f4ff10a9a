"""The ``gguf`` family: llama.cpp's tensor types, costed and quantized as llama.cpp does.

The contract suite (``test_contract.py``) runs every member through the shared checks; these
tests pin what is particular to llama.cpp's types: their published bits per weight, their block
rules, their error ladder, the imatrix, and bytes equal to a real GGUF file's.
"""

from __future__ import annotations

import libgguf
import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import GGUFFamily, GGUFFormat, default_palette, parse_format

# Bits per weight of each type: block bytes * 8 / block size, from llama.cpp's block structs
# (ggml-common.h). IQ2_S is 82 bytes per 256 weights, 2.5625 bits, though llama-quantize's help
# rounds it to "2.5 bpw".
BITS_PER_WEIGHT = {
    "Q2_K": 2.625,
    "Q3_K": 3.4375,
    "Q4_K": 4.5,
    "Q5_K": 5.5,
    "Q6_K": 6.5625,
    "Q8_0": 8.5,
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "IQ2_XS": 2.3125,
    "IQ2_S": 2.5625,
    "IQ3_XXS": 3.0625,
    "IQ3_S": 3.4375,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
    "MXFP4": 4.25,
    "F16": 16.0,
}
BLOCK_256 = (
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "IQ4_XS",
)
BLOCK_32 = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "MXFP4")
K_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
MEMBERS = GGUFFamily().members()


def weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Gaussian weights with uneven column scales, the same for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    columns = torch.rand(1, shape[1], generator=gen) * 3 + 0.1
    return torch.randn(*shape, generator=gen) * 0.02 * columns


def skewed_importance(n: int, seed: int = 100) -> torch.Tensor:
    """Log-normal importances spanning a few orders of magnitude, like real activations'."""
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(2 * torch.randn(n, generator=gen))


def test_the_members_are_the_documented_types():
    assert [f.type for f in MEMBERS] == list(BITS_PER_WEIGHT)
    assert {f.type for f in MEMBERS if f.block_size == 256} == set(BLOCK_256)
    assert {f.type for f in MEMBERS if f.block_size == 32} == set(BLOCK_32)
    assert [f.type for f in MEMBERS if f.is_float] == ["F16"]


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_bits_per_weight_are_llama_cpp_values(fmt):
    expected = BITS_PER_WEIGHT[fmt.type]
    assert fmt.nominal_bits == expected
    # 512 is a whole number of blocks for every type, so the exact cost is the nominal one.
    assert fmt.storage_bits((3, 512)) == 3 * 512 * expected
    assert fmt.storage_bits((3, 512)) == 3 * libgguf.row_size(fmt.qtype, 512) * 8
    assert fmt.bits_per_weight((7, 1536)) == expected


@pytest.mark.parametrize("name", BLOCK_256)
def test_256_block_types_refuse_smollm2_hidden_width(name):
    fmt = GGUFFormat(name)
    for call in (fmt.check_shape, fmt.storage_bits):
        with pytest.raises(BitallocError, match=r"blocks of 256 .* width of 576 .*gguf:Q4_0"):
            call((576, 576))
    with pytest.raises(BitallocError, match="576"):
        fmt.fake_quantize(torch.zeros(2, 576))
    assert not fmt.allows((576, 576))
    # down_proj's input width, 1536 = 6 x 256, fits.
    assert fmt.check_shape((576, 1536)) == (576, 1536)
    assert fmt.storage_bits((576, 1536)) == 576 * libgguf.row_size(fmt.qtype, 1536) * 8
    # A width no 32-block type takes either points at F16.
    with pytest.raises(BitallocError, match="multiple of 256: .*gguf:F16"):
        fmt.check_shape((4, 200))


@pytest.mark.parametrize("name", BLOCK_32)
def test_32_block_types_need_whole_blocks(name):
    fmt = GGUFFormat(name)
    with pytest.raises(BitallocError, match=r"blocks of 32 .* width of 40 .*gguf:F16"):
        fmt.check_shape((10, 40))
    assert fmt.check_shape((576, 576)) == (576, 576)
    assert fmt.check_shape((10, 64)) == (10, 64)


def test_f16_takes_any_width():
    assert GGUFFormat("F16").storage_bits((10, 41)) == 10 * 41 * 16


def test_error_falls_along_the_k_quant_ladder():
    w = weight((64, 512), seed=1)
    errors = [float((GGUFFormat(t).fake_quantize(w) - w).norm() / w.norm()) for t in K_LADDER]
    # Each rung roughly halves the error; 1.5x keeps the margin far from noise.
    assert all(b * 1.5 < a for a, b in zip(errors, errors[1:])), dict(zip(K_LADDER, errors))


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "IQ4_XS"])
def test_importance_lowers_the_importance_weighted_error(name):
    fmt = GGUFFormat(name)
    w = weight((64, 512), seed=2)
    imp = skewed_importance(512)

    def weighted_error(q: torch.Tensor) -> float:
        return float(((q - w).square() * imp).sum())

    plain = fmt.fake_quantize(w)
    weighted = fmt.fake_quantize(w, importance=imp)
    # About 0.5-0.7x on these weights; summed over all rows, so no single row decides.
    assert weighted_error(weighted) < 0.85 * weighted_error(plain)
    assert torch.equal(weighted, fmt.fake_quantize(w.clone(), importance=imp.clone()))
    assert torch.equal(plain, fmt.fake_quantize(w))


@pytest.mark.parametrize("fmt", [f for f in MEMBERS if not f.is_float], ids=str)
def test_bytes_with_importance_are_llama_cpps_with_that_imatrix(fmt):
    # The family rescales the importance by a power of two before llama.cpp sees it; in range,
    # that must leave llama.cpp's bytes exactly as it writes them from the imatrix as given.
    w = weight((8, 512), seed=8)
    imp = skewed_importance(512, seed=9)
    expected = libgguf.quantize_rows(w.numpy(), fmt.qtype, imatrix=imp.numpy())
    assert fmt.quantize_bytes(w, importance=imp) == expected.tobytes()


@pytest.mark.parametrize("name", ["Q4_K", "IQ3_S", "Q4_0"])
def test_importance_scale_by_powers_of_two_changes_nothing(name):
    # Far outside float32's comfortable range llama.cpp alone overflows or underflows (1e37
    # zeroes whole Q4_K blocks); the family rescales by a power of two, which is exact.
    fmt = GGUFFormat(name)
    w = weight((8, 512), seed=3)
    imp = skewed_importance(512)
    reference = fmt.fake_quantize(w, importance=imp)
    for scale in (2.0**100, 2.0**-100, 2.0**-60):
        assert torch.equal(fmt.fake_quantize(w, importance=imp * scale), reference), scale


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "IQ2_XS", "IQ4_NL"])
def test_a_block_without_importance_gets_the_plain_block(name):
    # llama.cpp stores a block whose imatrix is all zero as zeros; the family gives it the
    # block it writes without an imatrix, and leaves every other block as weighted.
    fmt = GGUFFormat(name)
    w = weight((4, 512), seed=4)
    imp = skewed_importance(512)
    dead = imp.clone()
    dead[:256] = 0
    plain = fmt.fake_quantize(w)
    out = fmt.fake_quantize(w, importance=dead)
    assert torch.equal(out[:, :256], plain[:, :256])
    assert torch.equal(out[:, 256:], fmt.fake_quantize(w, importance=imp)[:, 256:])
    assert out[:, :256].abs().sum() > 0
    assert torch.equal(fmt.fake_quantize(w, importance=torch.zeros(512)), plain)


def test_imatrix_types_quantize_without_importance_as_with_equal_weights():
    # llama.cpp refuses IQ2_XS without an imatrix; the plain choice is an imatrix of ones,
    # so each row's result depends on that row alone.
    fmt = GGUFFormat("IQ2_XS")
    w = weight((6, 256), seed=5)
    assert torch.equal(fmt.fake_quantize(w), fmt.fake_quantize(w, importance=torch.ones(256)))
    assert torch.equal(fmt.fake_quantize(w[:3]), fmt.fake_quantize(w)[:3])


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_bytes_are_the_stored_form(fmt):
    shape = (4, 256)
    w = weight(shape, seed=6)
    data = fmt.quantize_bytes(w)
    assert isinstance(data, bytes) and len(data) * 8 == fmt.storage_bits(shape)
    restored = fmt.dequantize_bytes(data, shape)
    assert restored.dtype == torch.float32 and restored.shape == shape
    assert torch.equal(restored, fmt.fake_quantize(w))
    assert torch.equal(fmt.dequantize_bytes(bytearray(data), shape), restored)
    for wrong in (data[:-1], data + b"\0", b""):
        with pytest.raises(BitallocError, match=f"in {len(data)} bytes .* got {len(wrong)}"):
            fmt.dequantize_bytes(wrong, shape)
    with pytest.raises(BitallocError):
        fmt.dequantize_bytes(data, (2, 256))


def test_f16_bytes_are_little_endian_half_floats():
    w = weight((3, 40), seed=7)
    data = GGUFFormat("F16").quantize_bytes(w)
    assert data == w.numpy().astype("<f2").tobytes()
    b = w.to(torch.bfloat16)
    assert torch.equal(GGUFFormat("F16").fake_quantize(b), b.half().to(torch.bfloat16))


def test_names_parse_in_any_case():
    assert parse_format("GGUF:q4_k") == GGUFFormat("Q4_K")
    assert parse_format(" gguf:iq4_xs ").name == "gguf:IQ4_XS"
    assert GGUFFormat("q4_k") == GGUFFormat("Q4_K")
    assert hash(GGUFFormat("q4_k")) == hash(GGUFFormat("Q4_K"))
    assert str(GGUFFormat("MXFP4")) == "gguf:MXFP4" and GGUFFormat("F16").family == "gguf"


@pytest.mark.parametrize("name", ["gguf:q7_k", "gguf:", "gguf:iq1_s", "gguf:q4_k_m"])
def test_unknown_types_list_the_supported_ones(name):
    with pytest.raises(BitallocError, match=r"llama.cpp type .*Q2_K, .*IQ4_XS, MXFP4, F16"):
        parse_format(name)


def test_bare_llama_cpp_names_are_not_claimed():
    # Only the gguf: prefix makes a name this family's; a bare 'q4_k' stays unknown.
    assert GGUFFamily().parse("q4_k") is None
    with pytest.raises(BitallocError, match="unknown format 'q4_k'.*gguf:Q4_K"):
        parse_format("q4_k")
    with pytest.raises(BitallocError, match="unsupported llama.cpp type"):
        GGUFFormat("Q7_K")


def test_the_family_is_opt_in():
    assert GGUFFamily().default_members() == ()
    assert "gguf:Q4_K" not in {f.name for f in default_palette()}
    assert all(f.family != "gguf" for f in default_palette())


@pytest.mark.slow
def test_requantizing_a_q4_1_tensor_of_the_default_model_gives_its_bytes():
    from gguf import GGUFReader

    from bitalloc.models import default_gguf_path

    reader = GGUFReader(str(default_gguf_path()))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_1", "Q8_0", "F32"}
    tensors = {t.name: t for t in reader.tensors}
    # q_proj is 576 wide (a 32-block width), ffn_down 1536 (256-block width): both layouts.
    for name in ("blk.3.attn_q.weight", "blk.3.ffn_down.weight"):
        tensor = tensors[name]
        assert tensor.tensor_type.name == "Q4_1"
        raw = np.asarray(tensor.data)
        # GGUF lists dimensions innermost first: (in, out).
        in_features, out_features = (int(d) for d in tensor.shape)
        stored = libgguf.dequantize_rows(
            raw, libgguf.GGMLQuantizationType.Q4_1, n_per_row=in_features
        )
        fmt = GGUFFormat("Q4_1")
        shape = (out_features, in_features)
        assert torch.equal(fmt.dequantize_bytes(raw.tobytes(), shape), torch.from_numpy(stored))
        # A Q4_1 block stores min and scale; its values requantize to themselves: the block's
        # least value is the stored min and its largest min + 15 * scale, so llama.cpp's
        # reference quantizer finds the same min, scale and codes, byte for byte.
        assert fmt.quantize_bytes(torch.from_numpy(stored)) == raw.tobytes()
    # Q8_0 (the token embedding) does the same: its largest magnitude is 127 * scale.
    embed = tensors["token_embd.weight"]
    raw = np.asarray(embed.data)[:512]
    stored = libgguf.dequantize_rows(raw, libgguf.GGMLQuantizationType.Q8_0, n_per_row=576)
    assert GGUFFormat("Q8_0").quantize_bytes(torch.from_numpy(stored)) == raw.tobytes()
