import pytest
import torch
from torch import nn

from bitalloc.formats import QuantFormat
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(
    not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel"
)


@pytest.mark.parametrize(("rows", "cols"), [(16, 32), (48, 64), (64, 256), (96, 128), (80, 96)])
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


def _timing(path, prefill_s, large_s):
    return cpu.PathTiming(path, 0.0, prefill_s, large_s, 0.0, True, 32, 512)


def test_crossover_rows_from_two_measured_lines():
    int4 = _timing(cpu.INT4PACK, 1.0, 10.0)  # slope 9/480 per row
    unpack = _timing(cpu.UNPACK_MATMUL, 2.0, 6.0)  # slope 4/480 per row
    # 1 + 9/480 (m - 32) = 2 + 4/480 (m - 32)  ->  m = 32 + 96
    assert cpu.crossover_rows(int4, unpack) == 128
    assert cpu.crossover_rows(int4, _timing(cpu.UNPACK_MATMUL, 2.0, 11.0)) is None
    assert cpu.crossover_rows(int4, _timing(cpu.UNPACK_MATMUL, 0.5, 6.0)) == 32


def test_int4pack_layer_unpacks_above_its_row_limit():
    torch.manual_seed(1)
    lin = nn.Linear(128, 48)
    fmt = QuantFormat(4, 64)
    layer = QuantLinear.from_linear(lin, fmt)
    layer.set_cpu_path(cpu.INT4PACK)
    layer.int4pack_max_rows = 16
    weight = fmt.fake_quantize(lin.weight)
    for rows, path, tolerance in (
        (8, cpu.INT4PACK, cpu.DEFAULT_TOLERANCE),
        (20, cpu.UNPACK_MATMUL, 1e-5),
    ):
        x = torch.randn(rows, 128)
        reference = torch.nn.functional.linear(x, weight, lin.bias)
        with torch.no_grad():
            error = float((layer(x) - reference).norm() / reference.norm())
        assert layer.last_path == path and error < tolerance
    assert layer.layout == "int4pack"  # unpacking reads the int4pack order; nothing converted
