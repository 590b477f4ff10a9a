import pytest
import torch
from torch import nn

from bitalloc.formats import QuantFormat
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(
    not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel"
)


@pytest.mark.parametrize(("rows", "cols"), [(16, 32), (48, 64), (64, 256), (96, 128)])
def test_int4pack_layout_round_trip(rows, cols):
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    packed = cpu.codes_to_int4pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == rows * cols // 2
    assert torch.equal(cpu.int4pack_to_codes(packed, rows, cols), codes)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4pack_matmul_matches_the_reference_within_bf16_tolerance(group):
    torch.manual_seed(group)
    weight = torch.randn(64, 256) * 0.05
    fmt = QuantFormat(4, group)
    q = fmt.quantize(weight)
    x = torch.randn(5, 256)
    y = cpu.int4pack_matmul(x, cpu.codes_to_int4pack(q.codes), q.scales, q.zeros, group)
    reference = x @ fmt.fake_quantize(weight).T
    error = float((y - reference).norm() / reference.norm())
    assert y.dtype == torch.float32 and error < cpu.DEFAULT_TOLERANCE
    assert error > 0  # bf16 activations: not bit-exact, which is why the tolerance is stated


def test_unsupported_reasons():
    assert cpu.int4pack_unsupported(4, 64, 64, 256) == ""
    assert "not 3-bit" in cpu.int4pack_unsupported(3, 64, 64, 256)
    assert "not a multiple of the group" in cpu.int4pack_unsupported(4, 128, 64, 576)
    assert "multiple of 16" in cpu.int4pack_unsupported(4, 64, 40, 256)


def test_measure_paths_reports_both_and_rejects_a_wrong_fast_path(monkeypatch):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(256, 64), QuantFormat(4, 64))
    timings = {t.path: t for t in cpu.measure_paths(layer, cpu.CPU_PATHS, repeats=2)}
    assert set(timings) == set(cpu.CPU_PATHS)
    assert all(t.correct and t.decode_s > 0 and t.prefill_s > 0 for t in timings.values())
    assert timings[cpu.UNPACK_MATMUL].error < 1e-5

    # A path that is fast but wrong must be measured as incorrect.
    monkeypatch.setattr(cpu, "int4pack_matmul", lambda x, *a, **k: torch.zeros(x.shape[0], 64))
    broken = {t.path: t for t in cpu.measure_paths(layer, cpu.CPU_PATHS, repeats=2)}
    assert not broken[cpu.INT4PACK].correct and broken[cpu.UNPACK_MATMUL].correct


def test_time_call_is_the_median():
    calls = []
    assert cpu.time_call(lambda: calls.append(1), repeats=3) >= 0
    assert len(calls) == 4  # one warm-up
