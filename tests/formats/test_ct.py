"""The ``ct`` family: compressed-tensors schemes, costed and quantized as the package does.

The contract suite (``test_contract.py``) runs every member through the shared checks; these
tests pin what is particular to compressed-tensors: the exact bytes its checkpoint stores per
scheme, its presets, its min-max quantization (against the package's own quantize and
dequantize), its compressors' round trip, the error ladder and the names.
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import CTFamily, CTFormat, default_palette, parse_format
from bitalloc.formats.ct import SCALE_DTYPE, SUPPORTED_SCHEMES

MEMBERS = CTFamily().members()
SHAPE = (64, 256)

# Per scheme: nominal bits per weight, and the bytes stored for a (64, 256) and a (10, 256)
# weight, summed from the tensors compressed-tensors writes. For int{b}-g{g}: codes
# out * in * b / 8, bfloat16 scales 2 * out * in / g, weight_shape 16 (two int64); -asym adds
# zero points packed by column, 4 * ceil(out * b / 32) * in / g. nvfp4: codes out * in / 2, FP8
# scales out * in / 16, the FP32 global scale 4. mxfp4: codes out * in / 2, E8M0 scales
# out * in / 32. fp8-channel: out * in FP8 values and a bfloat16 scale per row, 2 * out.
EXPECTED = {
    "int4-g32": (4.5, 8192 + 1024 + 16, 1280 + 160 + 16),
    "int4-g64": (4.25, 8192 + 512 + 16, 1280 + 80 + 16),
    "int4-g128": (4.125, 8192 + 256 + 16, 1280 + 40 + 16),
    "int4-g32-asym": (4.625, 9232 + 4 * 8 * 8, 1456 + 4 * 2 * 8),
    "int4-g64-asym": (4.3125, 8720 + 4 * 8 * 4, 1376 + 4 * 2 * 4),
    "int4-g128-asym": (4.15625, 8464 + 4 * 8 * 2, 1336 + 4 * 2 * 2),
    "int8-g32": (8.5, 16384 + 1024 + 16, 2560 + 160 + 16),
    "int8-g64": (8.25, 16384 + 512 + 16, 2560 + 80 + 16),
    "int8-g128": (8.125, 16384 + 256 + 16, 2560 + 40 + 16),
    "int8-g32-asym": (8.75, 17424 + 4 * 16 * 8, 2736 + 4 * 3 * 8),
    "int8-g64-asym": (8.375, 16912 + 4 * 16 * 4, 2656 + 4 * 3 * 4),
    "int8-g128-asym": (8.1875, 16656 + 4 * 16 * 2, 2616 + 4 * 3 * 2),
    "nvfp4": (4.5, 8192 + 1024 + 4, 1280 + 160 + 4),
    "mxfp4": (4.25, 8192 + 512, 1280 + 80),
    "fp8-channel": (8 + 16 / 4096, 16384 + 128, 2560 + 20),
}
PRESETS = {
    "W4A16": "int4-g128",
    "W4A16_ASYM": "int4-g128-asym",
    "W8A16": "int8-g128",
    "NVFP4A16": "nvfp4",
    "MXFP4A16": "mxfp4",
    "FP8_DYNAMIC": "fp8-channel",  # its weights; the preset also quantizes activations
}


def weight(shape: tuple[int, int] = SHAPE, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with uneven column scales, the same for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    columns = torch.rand(1, shape[1], generator=gen) * 3 + 0.1
    return torch.randn(*shape, generator=gen) * 0.02 * columns


def mse(fmt: CTFormat, w: torch.Tensor) -> float:
    return (fmt.fake_quantize(w) - w).square().mean().item()


# --- members, names and the package's description ---------------------------------------------
def test_the_members_are_the_documented_schemes():
    assert [f.scheme for f in MEMBERS] == list(EXPECTED) == list(SUPPORTED_SCHEMES)
    assert all(f.family == "ct" and f.name == "ct:" + f.scheme for f in MEMBERS)
    assert not any(f.is_float for f in MEMBERS)
    # Opt-in, like gguf: the default palette stays the int family's.
    assert CTFamily().default_members() == ()
    assert not any(f.family == "ct" for f in default_palette())


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_bits_per_weight_are_the_checkpoints_bytes(fmt):
    nominal, big, small = EXPECTED[fmt.scheme]
    assert fmt.nominal_bits == nominal
    assert fmt.storage_bits(SHAPE) == 8 * big
    assert fmt.storage_bits((10, 256)) == 8 * small
    assert fmt.bits_per_weight(SHAPE) == 8 * big / (64 * 256)
    # Per-tensor constants (weight_shape, the global scale) vanish at a real size.
    assert fmt.bits_per_weight((4096, 4096)) == pytest.approx(nominal, abs=1e-5)


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
@pytest.mark.parametrize("shape", [SHAPE, (10, 256)], ids=["64x256", "10x256"])
def test_the_layout_is_what_the_compressor_writes(fmt, shape):
    tensors = fmt.compress(weight(shape))
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == fmt.layout(shape)
    assert 8 * sum(t.numel() * t.element_size() for t in tensors.values()) == fmt.storage_bits(
        shape
    )
    scale = tensors["weight_scale"].dtype
    if fmt.kind in ("int", "fp8"):
        assert scale == SCALE_DTYPE == torch.bfloat16


def test_quantization_args_are_the_presets_and_formats_what_the_package_infers():
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme

    for preset, scheme in PRESETS.items():
        expected = preset_name_to_scheme(preset, ["Linear"]).weights
        assert CTFormat(scheme).quantization_args() == expected, preset
    for fmt in MEMBERS:
        scheme = fmt.quantization_scheme(["model.layers.0.mlp.down_proj"])
        assert scheme.input_activations is None and scheme.output_activations is None
        assert scheme.targets == ["model.layers.0.mlp.down_proj"]
        unset = scheme.model_copy(update={"format": None})
        assert infer_module_format(torch.nn.Linear, unset).value == fmt.compression_format
    assert {f.compression_format for f in MEMBERS} == {
        "pack-quantized",
        "nvfp4-pack-quantized",
        "mxfp4-pack-quantized",
        "naive-quantized",
    }


def test_names_parse_and_unsupported_ones_are_refused():
    fmt = parse_format("ct:int4-g128")
    assert fmt == CTFormat("int4-g128") == parse_format("  CT:INT4-G128 ") == CTFormat("INT4-G128")
    assert (fmt.bits, fmt.group, fmt.symmetric, fmt.kind) == (4, 128, True, "int")
    assert CTFormat("int8-g32-asym").symmetric is False
    assert (CTFormat("nvfp4").group, CTFormat("mxfp4").group, CTFormat("fp8-channel").group) == (
        16,
        32,
        None,
    )
    # The int family keeps its own names.
    assert parse_format("int4-g128").family == "int"
    with pytest.raises(BitallocError, match=r"'int3-g128'.*int widths: 4, 8"):
        parse_format("ct:int3-g128")
    with pytest.raises(BitallocError, match=r"'int4-g256'.*int groups: 32, 64, 128"):
        parse_format("ct:int4-g256")
    with pytest.raises(BitallocError, match="unknown compressed-tensors scheme 'nvfp8'.*mxfp4"):
        parse_format("ct:nvfp8")
    with pytest.raises(BitallocError, match="unknown compressed-tensors scheme ''"):
        parse_format("ct:")
    with pytest.raises(BitallocError, match="unsupported compressed-tensors scheme 'w4a16'"):
        CTFormat("w4a16")
    assert CTFamily().parse("gguf:Q4_K") is None


def test_shapes_with_a_partial_group_are_refused_naming_what_fits():
    with pytest.raises(BitallocError, match=r"groups of 128 .* 96 is not a multiple of 128") as e:
        CTFormat("int4-g128").check_shape((64, 96))
    fits = str(e.value)
    assert "ct:int4-g32" in fits and "ct:nvfp4" in fits and "ct:fp8-channel" in fits
    assert "ct:int4-g64," not in fits and "fp16" in fits
    assert not CTFormat("nvfp4").allows((64, 40))
    assert not CTFormat("mxfp4").allows((64, 48))
    assert CTFormat("nvfp4").allows((64, 48))
    # One scale per row: any width.
    assert CTFormat("fp8-channel").check_shape((3, 7)) == (3, 7)
    with pytest.raises(BitallocError, match="multiple of 32"):
        CTFormat("mxfp4").fake_quantize(weight((4, 48)))


# --- quantization ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_fake_quantize_is_the_packages_quantize_then_dequantize(fmt):
    """Min-max statistics per group (per row for fp8-channel) through the package's
    calculate_qparams, then its quantize and dequantize: what our format gives."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    w = weight(seed=3)
    args = fmt.quantization_args()
    if fmt.group is None:
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        groups = w.reshape(64, -1, fmt.group)
        low, high = groups.amin(-1), groups.amax(-1)
    gscale = generate_gparam(w.amin(), w.amax()) if fmt.kind == "nvfp4" else None
    observed = args.model_copy(update={"scale_dtype": args.scale_dtype or torch.bfloat16})
    scale, zero = calculate_qparams(low, high, observed, global_scale=gscale)
    if fmt.kind in ("int", "fp8"):
        scale = scale.to(torch.bfloat16)  # the dtype the exporter stores
    zero = None if fmt.symmetric else zero
    codes = quantize(w, scale, zero, args, global_scale=gscale)
    expected = dequantize(codes, scale, zero, args, global_scale=gscale)
    ours = fmt.fake_quantize(w)
    assert torch.equal(ours, expected.to(torch.bfloat16).float())
    assert ours.dtype == torch.float32
    # The statistics are min-max: the scale maps the group's largest magnitude to the grid's
    # end (symmetric int: (2**b - 1) / 2, FP4: 6, FP8: 448).
    if fmt.kind == "int" and fmt.symmetric:
        top = torch.maximum(high.abs(), low.abs())
        assert torch.equal(scale, (top / ((2**fmt.bits - 1) / 2)).to(torch.bfloat16))
    if fmt.kind == "fp8":
        top = torch.maximum(high.abs(), low.abs())
        assert torch.equal(scale, (top / 448).to(torch.bfloat16))
    if fmt.kind == "nvfp4":
        assert gscale.item() == pytest.approx(448 * 6 / w.abs().max().item())
    if fmt.kind == "mxfp4":
        assert torch.equal(scale, 2 ** torch.log2(scale).round())  # powers of two


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_the_packages_compressors_round_trip_to_the_fake_quantized_weight(fmt):
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt.compression_format)
    for dtype in (torch.float32, torch.bfloat16):
        w = weight(seed=5).to(dtype)
        compressed = fmt.compress(w)
        state = compressor.decompress(dict(compressed), fmt.quantization_scheme())
        ours = fmt.fake_quantize(w)
        assert ours.dtype == dtype
        assert torch.equal(state["weight"].to(dtype), ours)
        assert torch.equal(fmt.decompress(compressed), ours.float())


def test_error_falls_as_bits_rise_and_as_groups_shrink():
    w = weight((64, 256), seed=11)
    for group in (32, 64, 128):
        for suffix in ("", "-asym"):
            int4, int8 = CTFormat(f"int4-g{group}{suffix}"), CTFormat(f"int8-g{group}{suffix}")
            assert int4.ladder[0] == int8.ladder[0] == f"ct:int-g{group}{suffix}"
            assert int4.ladder[1] < int8.ladder[1]
            assert mse(int8, w) < mse(int4, w) / 100
    for bits in (4, 8):
        for suffix in ("", "-asym"):
            errors = [mse(CTFormat(f"int{bits}-g{g}{suffix}"), w) for g in (128, 64, 32)]
            assert errors[0] > errors[1] > errors[2], (bits, suffix, errors)
    # The FP schemes are on no ladder; FP8 per channel beats every 4-bit scheme.
    assert {CTFormat(s).ladder for s in ("nvfp4", "mxfp4", "fp8-channel")} == {None}
    fp8 = mse(CTFormat("fp8-channel"), w)
    assert all(fp8 < mse(f, w) for f in MEMBERS if f.bits == 4)


def test_importance_is_checked_and_ignored():
    w = weight()
    gen = torch.Generator().manual_seed(1)
    importance = torch.exp(2 * torch.randn(256, generator=gen))
    for fmt in (CTFormat("int4-g128-asym"), CTFormat("nvfp4")):
        assert torch.equal(fmt.fake_quantize(w, importance), fmt.fake_quantize(w))
        with pytest.raises(BitallocError, match="importance"):
            fmt.fake_quantize(w, importance=-importance)


def test_zero_weights_stay_zero_and_the_symmetric_int_grid_stops_short_of_its_top():
    for fmt in MEMBERS:
        assert torch.equal(fmt.fake_quantize(torch.zeros(8, 128)), torch.zeros(8, 128))
    # The package's symmetric scale is max|w| / ((2**b - 1) / 2): the largest magnitude is
    # 7.5 steps at 4 bits, and the codes stop at 7 (a positive maximum is clamped there; this
    # negative one, 7.49 steps of the scale rounded up to bfloat16, rounds to -7).
    w = torch.full((4, 128), 0.375)
    w[:, 64:] = -0.375
    step = torch.tensor(0.375 / 7.5).to(torch.bfloat16)
    out = CTFormat("int4-g128").fake_quantize(w)
    assert torch.equal(out, torch.sign(w) * (7 * step).float())


def test_nvfp4_takes_a_shared_global_scale():
    fmt = CTFormat("nvfp4")
    w = weight(seed=2)
    own = fmt.global_scale(w)
    shared = own * 0.7  # as for a fused sibling with a wider range
    tensors = fmt.compress(w, global_scale=shared)
    assert torch.equal(tensors["weight_global_scale"], shared)
    assert tensors["weight_global_scale"].dtype == torch.float32
    again = fmt.decompress(tensors)
    assert not torch.equal(again, fmt.fake_quantize(w))
    assert (again - w).square().mean() < 2 * mse(fmt, w)
    for bad in (torch.tensor([0.0]), torch.tensor([float("inf")]), torch.ones(2), 3.0):
        with pytest.raises(BitallocError, match="global scale"):
            fmt.compress(w, global_scale=bad)
    with pytest.raises(BitallocError, match="only ct:nvfp4"):
        CTFormat("mxfp4").global_scale(w)
    with pytest.raises(BitallocError, match="only ct:nvfp4"):
        CTFormat("int4-g128").compress(w, global_scale=own)


def test_without_the_package_costs_work_and_quantizing_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    fmt = CTFormat("int4-g128")
    assert fmt.storage_bits(SHAPE) == 8 * EXPECTED["int4-g128"][1]
    with pytest.raises(BitallocError, match="pip install 'compressed-tensors"):
        fmt.fake_quantize(weight())
