"""The int4pack path under every CPU capability torch offers on this machine.

torch packs int4 weights in a different layout per capability (``ATEN_CPU_CAPABILITY``, read
once at start-up), so each capability gets its own child process. The child reports the
capability that took effect, so a run that silently fell back to another one fails here.
"""

import json

import pytest

from bitalloc.kernels import cpu
from tests.kernels.capabilities import offered, run_under

CHILD = """
import json
import torch
import torch.nn.functional as F
from torch import nn
from bitalloc.formats import QuantFormat
from bitalloc.kernels import cpu
from bitalloc.kernels.quant_linear import QuantLinear

probe = cpu.int4pack_probe()
torch.manual_seed(0)
trips = []
for rows, cols in ((16, 32), (48, 64), (80, 96), (112, 128), (64, 256), (208, 64)):
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    back = cpu.int4pack_to_codes(cpu.codes_to_int4pack(codes), rows, cols)
    trips.append(bool(torch.equal(back, codes)))
errors, paths = {}, set()
for group in (32, 64, 128, 256):
    lin = nn.Linear(256, 80)
    fmt = QuantFormat(4, group)
    layer = QuantLinear.from_linear(lin, fmt)
    layer.set_cpu_path(cpu.INT4PACK)
    for rows in (1, 40):
        x = torch.randn(rows, 256)
        reference = F.linear(x, fmt.fake_quantize(lin.weight), lin.bias)
        with torch.no_grad():
            y = layer(x)
        errors[f"{group}x{rows}"] = float((y - reference).norm() / reference.norm())
        paths.add(layer.last_path)
print(json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "probe_ok": probe.ok,
    "probe": probe.describe(),
    "probe_ms": probe.seconds * 1e3,
    "trips": trips,
    "errors": errors,
    "paths": sorted(paths),
}))
"""


@pytest.mark.skipif(not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_int4pack_under_each_cpu_capability(capability):
    if not offered(capability):
        pytest.skip(f"this CPU does not offer {capability}")
    result = run_under(capability, CHILD)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["capability"] == capability.upper(), report  # the variable took effect
    # torch's kernel agrees on every capability torch 2.13 offers; where a later torch does
    # not, the probe turns the path off (tests/kernels/test_int4pack.py) and this fails loudly.
    assert report["probe_ok"], report["probe"]
    assert all(report["trips"]), report
    assert max(report["errors"].values()) < cpu.DEFAULT_TOLERANCE, report
    assert report["paths"] == [cpu.INT4PACK]
