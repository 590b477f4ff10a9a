import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import SUPPORTED_BITS, QuantFormat
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import TRITON, Float16Linear, QuantLinear

# The unpack-matmul path computes exactly what fake quantization computes, in float32; only the
# order of the matmul's sums may differ.
UNPACK_RTOL = 1e-5


def _linear(out_features=48, in_features=160, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_output_equals_fake_quantized_reference(bits, group):
    lin = _linear()
    fmt = QuantFormat(bits, group)
    layer = QuantLinear.from_linear(lin, fmt)
    x = torch.randn(2, 5, 160)
    reference = F.linear(x, fmt.fake_quantize(lin.weight), lin.bias)
    y = layer(x)
    assert y.shape == (2, 5, 48)
    assert _rel(y, reference) < UNPACK_RTOL
    assert layer.last_path == cpu.UNPACK_MATMUL
    assert layer.nbytes == fmt.storage_bits((48, 160)) // 8


def test_error_falls_as_bits_rise():
    lin = _linear(bias=False)
    x = torch.randn(8, 160)
    exact = lin(x)
    errors = [
        _rel(QuantLinear.from_linear(lin, QuantFormat(b, 64))(x), exact) for b in SUPPORTED_BITS
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_float16_unit_keeps_sixteen_bits():
    lin = _linear()
    layer = Float16Linear.from_linear(lin)
    x = torch.randn(3, 160)
    assert layer.weight.dtype == torch.float16 and layer.nbytes == 48 * 160 * 2
    reference = F.linear(x, lin.weight.half().float(), lin.bias)
    assert _rel(layer(x), reference) < UNPACK_RTOL
    assert layer.last_path == "fp16-as-float32"


def test_bias_free_layer_and_state_dict_keys():
    layer = QuantLinear.from_linear(_linear(bias=False), QuantFormat(3, 32))
    assert layer.bias is None
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros"}
    with_bias = QuantLinear.from_linear(_linear(), QuantFormat(3, 32))
    assert set(with_bias.state_dict()) == {"qweight", "scales", "zeros", "bias"}


def test_wrong_input_width_raises():
    layer = QuantLinear.from_linear(_linear(), QuantFormat(4, 32))
    with pytest.raises(BitallocError, match="takes 160"):
        layer(torch.randn(2, 159))


def test_unsupported_path_says_why():
    layer = QuantLinear.from_linear(_linear(), QuantFormat(3, 32))
    with pytest.raises(BitallocError, match="4-bit codes, not 3-bit"):
        layer.set_cpu_path(cpu.INT4PACK)
    with pytest.raises(BitallocError, match="unknown path"):
        layer.set_cpu_path("magic")
    with pytest.raises(BitallocError, match="unsupported code width"):
        QuantLinear(64, 16, bits=7, group_size=32)


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
def test_int4pack_layout_holds_the_same_bytes_and_saves_canonically():
    lin = _linear(out_features=48, in_features=128)
    layer = QuantLinear.from_linear(lin, QuantFormat(4, 64))
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    nbytes = layer.nbytes
    layer.set_cpu_path(cpu.INT4PACK)
    assert layer.layout == "int4pack" and layer.nbytes == nbytes
    x = torch.randn(4, 128)
    reference = F.linear(x, QuantFormat(4, 64).fake_quantize(lin.weight), lin.bias)
    assert _rel(layer(x), reference) < cpu.DEFAULT_TOLERANCE
    assert layer.last_path == cpu.INT4PACK
    # The state dict stays in the plane layout, whatever the layer runs on.
    for key, value in layer.state_dict().items():
        assert torch.equal(value, saved[key]), key
    fresh = QuantLinear(128, 48, 4, 64, bias=True)
    fresh.set_cpu_path(cpu.INT4PACK)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.cpu_path == cpu.UNPACK_MATMUL and _rel(fresh(x), reference) < UNPACK_RTOL
    layer.set_cpu_path(cpu.UNPACK_MATMUL)
    assert torch.equal(layer.qweight, saved["qweight"])


def test_triton_path_in_the_interpreter():
    from bitalloc.kernels import triton_kernels

    if not triton_kernels.triton_available() or torch.cuda.is_available():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, no CUDA)")
    lin = _linear(out_features=48, in_features=96)
    fmt = QuantFormat(3, 32)
    layer = QuantLinear.from_linear(lin, fmt)
    layer.set_cpu_path(TRITON)
    for rows, kernel in ((3, "triton-gemv"), (20, "triton-gemm")):
        x = torch.randn(rows, 96)
        reference = F.linear(x, fmt.fake_quantize(lin.weight), lin.bias)
        assert _rel(layer(x), reference) < 1e-4
        assert layer.last_path == kernel
