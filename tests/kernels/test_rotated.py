"""RotatedLinear: a rotated format's packed unit computes the fake-quantized rotated weight on
every path its inner QuantLinear runs, stores the base's bytes, and is seen by path choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, get_family, parse_format
from bitalloc.formats.rotation import RotatedFormat
from bitalloc.kernels import cpu
from bitalloc.kernels.paths import choose_cpu_paths, cpu_path_report, packed_layers
from bitalloc.kernels.quant_linear import TRITON, QuantLinear, int_layout
from bitalloc.kernels.rotated import RotatedLinear

UNPACK_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def rht_family():
    """The built-in family (registered when bitalloc.formats is imported)."""
    return get_family("rht")


def _linear(out_features=48, in_features=160, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight[:, 5] *= 30  # an outlier input channel, what rotation is for
    return linear


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(
    "name", ["int2-g32+rht", "int3-g64+rht-s9", "int4-g32+rht", "int8-g32+rht"]
)
def test_output_equals_the_fake_quantized_rotated_weight(name):
    lin = _linear()
    fmt = parse_format(name)
    layer = RotatedLinear.from_linear(lin, fmt)
    x = torch.randn(2, 5, 160)
    reference = F.linear(x, fmt.fake_quantize(lin.weight), lin.bias)
    y = layer(x)
    assert y.shape == (2, 5, 48) and _rel(y, reference) < UNPACK_RTOL
    assert layer.last_path == cpu.UNPACK_MATMUL
    assert torch.allclose(layer.dequantized_weight(), fmt.fake_quantize(lin.weight), atol=1e-6)
    # The stored bytes are the base layout's, exactly as for the plain int format.
    assert layer.nbytes == layer.inner.nbytes == fmt.storage_bits((48, 160)) // 8
    assert layer.format is fmt and layer.inner.format == fmt.base
    assert layer.shape == (48, 160) and layer.bias is layer.inner.bias


def test_importance_is_rotated_as_the_format_rotates_it():
    lin = _linear(bias=False)
    fmt = parse_format("int3-g32+rht-s2")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 160, generator=gen) * torch.linspace(0.1, 3, 160)
    for importance in (x.square().mean(0), x.T @ x / 256):
        layer = RotatedLinear.from_linear(lin, fmt, importance)
        reference = F.linear(x, fmt.fake_quantize(lin.weight, importance))
        assert _rel(layer(x), reference) < UNPACK_RTOL
    gptq = parse_format("int3-g32+gptq+rht-s2")
    gram = x.T @ x / 256
    layer = RotatedLinear.from_linear(lin, gptq, gram)
    assert _rel(layer(x), F.linear(x, gptq.fake_quantize(lin.weight, gram))) < UNPACK_RTOL
    assert layer.inner.format == gptq.base


def test_half_precision_inputs_and_bias_free_layers():
    lin = _linear(bias=False)
    fmt = parse_format("int4-g32+rht")
    layer = RotatedLinear.from_linear(lin, fmt)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"inner.qweight", "inner.scales", "inner.zeros"}
    x = torch.randn(3, 160)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), F.linear(x, fmt.fake_quantize(lin.weight))) < 0.02


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
def test_path_choice_finds_the_inner_layer_and_int4pack_runs_it():
    lin = _linear(out_features=48, in_features=128)
    fmt = parse_format("int4-g64+rht-s3")
    model = nn.Sequential(RotatedLinear.from_linear(lin, fmt))
    layers = packed_layers(model)
    assert list(layers) == ["0.inner"] and layers["0.inner"] is model[0].inner
    choice = choose_cpu_paths(model, cpu.INT4PACK, progress=False)
    expected = cpu.INT4PACK if cpu.int4pack_probe().ok else cpu.UNPACK_MATMUL
    assert choice.paths == {"0.inner": expected}
    x = torch.randn(4, 128)
    reference = F.linear(x, fmt.fake_quantize(lin.weight), lin.bias)
    assert _rel(model(x), reference) < cpu.DEFAULT_TOLERANCE
    assert model[0].last_path == model[0].inner.cpu_path
    assert model[0].nbytes == fmt.storage_bits((48, 128)) // 8  # int4pack keeps the bytes
    auto = choose_cpu_paths(model, "auto", repeats=1, progress=False)
    # The inner layer is measured against its own dequantized weight: every path is judged.
    assert set(auto.timings) == {"int4-g64 48x128"}
    assert _rel(model(x), reference) < cpu.DEFAULT_TOLERANCE
    assert "units per CPU path" in cpu_path_report(model)


def test_triton_path_in_the_interpreter():
    from bitalloc.kernels import triton_kernels

    if not triton_kernels.triton_available() or torch.cuda.is_available():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, no CUDA)")
    lin = _linear(out_features=48, in_features=96)
    fmt = parse_format("int3-g32+rht-s1")
    layer = RotatedLinear.from_linear(lin, fmt)
    layer.inner.set_cpu_path(TRITON)
    x = torch.randn(3, 96)
    reference = F.linear(x, fmt.fake_quantize(lin.weight), lin.bias)
    assert _rel(layer(x), reference) < 1e-4 and layer.last_path == "triton-gemv"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_rotation_and_triton_kernels_match_the_cpu():
    lin = _linear(out_features=256, in_features=576)
    fmt = parse_format("int3-g64+rht-s4")
    layer = RotatedLinear.from_linear(lin, fmt)
    x = torch.randn(2, 7, 576)
    expected = layer(x)
    gpu = layer.to("cuda")
    for rows in (1, 16):
        xs = x.reshape(-1, 576)[:rows]
        assert _rel(gpu(xs.cuda()).cpu(), expected.reshape(-1, 256)[:rows]) < 1e-4
        assert gpu.last_path.startswith("triton")
    half = gpu(x.cuda().half())
    assert half.dtype == torch.float16 and _rel(half.float().cpu(), expected) < 5e-3


def test_wrong_inputs_and_mismatched_layers_raise():
    lin = _linear()
    fmt = parse_format("int4-g32+rht")
    layer = RotatedLinear.from_linear(lin, fmt)
    with pytest.raises(BitallocError, match="takes 160"):
        layer(torch.randn(2, 159))
    plain = QuantLinear.from_linear(lin, QuantFormat(3, 32))
    with pytest.raises(BitallocError, match="stored as int4-g32.*int3-g32 codes"):
        RotatedLinear(plain, fmt)
    with pytest.raises(BitallocError, match="needs a rotated format"):
        RotatedLinear(plain, QuantFormat(3, 32))  # type: ignore[arg-type]
    # A plain QuantLinear refuses a rotated format: it would skip the input's rotation.
    with pytest.raises(BitallocError, match="RotatedLinear"):
        QuantLinear.from_linear(lin, fmt)
    with pytest.raises(BitallocError, match="input width of 100"):
        RotatedLinear.from_linear(nn.Linear(100, 16), parse_format("int4-g32+rht"))


def test_int_layout_is_found_by_duck_typing():
    assert int_layout(QuantFormat(3, 64)) == QuantFormat(3, 64)
    assert int_layout(QuantFormat(16, None)) is None
    # Rotated codes dequantize to Q(W R), not the weight: not a plain int layout.
    rotated = parse_format("int3-g64+rht")
    assert int_layout(rotated) is None and rotated.stored_int_format == QuantFormat(3, 64)
    assert not hasattr(rotated, "int_format") and not hasattr(rotated, "quantize")
    assert int_layout(parse_format("int3-g64+gptq")) == QuantFormat(3, 64)
    assert int_layout(parse_format("gguf:q4_k")) is None
    assert RotatedFormat(parse_format("gguf:q4_k")).stored_int_format is None
    with pytest.raises(BitallocError, match="no int codes"):
        RotatedFormat(parse_format("gguf:q4_k")).quantize_rotated(torch.randn(8, 256))
