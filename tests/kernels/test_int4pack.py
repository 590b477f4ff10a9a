"""The int4pack layout is learned from torch, whatever the CPU; a converter or kernel that
does not agree with bitalloc turns the path off and says why, never computes garbage."""

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.kernels import cpu, int4pack
from bitalloc.kernels.int4pack import Int4PackLayout

pytestmark = pytest.mark.skipif(
    not cpu.int4pack_available(), reason="torch lacks the int4pack CPU kernel"
)


def _fresh_probe(capability="TEST"):
    """The probe run now, past the per-capability cache (which keeps the real result)."""
    return int4pack._probe_for.__wrapped__(capability)


def _pack(codes, layout):
    """Pack ``codes`` by ``layout`` (the family the module docstring describes), in Python."""
    rows, cols = codes.shape
    out = []
    for start in range(0, rows, layout.block_rows):
        height = min(layout.block_rows, rows - start)
        order = layout.rows_of(height)
        for k in range(cols):
            slots = [int(codes[start + r, k]) for r in order]
            out += [lo | (hi << 4) for lo, hi in zip(slots[::2], slots[1::2], strict=True)]
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, cols // 2)


def _random_layout(block, seed):
    g = torch.Generator().manual_seed(seed)
    return Int4PackLayout(
        block,
        tuple(tuple(torch.randperm(h, generator=g).tolist()) for h in range(16, block + 1, 16)),
    )


def test_the_probe_learns_this_cpus_layout_and_torch_agrees():
    probe = int4pack.int4pack_probe()
    assert probe.capability == int4pack.cpu_capability()
    assert probe.ok and probe.reason == "" and probe.layout is not None, probe.describe()
    assert probe.layout.block_rows % 16 == 0 and 0 < probe.seconds < 30
    assert probe.capability in probe.describe() and "int4pack on" in probe.describe()
    assert int4pack.int4pack_probe() is probe  # once per capability


@pytest.mark.parametrize(("block", "seed"), [(16, 0), (32, 1), (64, 2)])
def test_reader_inverts_any_layout_of_the_family(block, seed):
    layout = _random_layout(block, seed)
    for rows, cols in ((block, 4), (block * 2 + 16, 6), (16, 2), (block + block // 2 + 16, 8)):
        if rows % 16:
            continue
        codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
        packed = _pack(codes, layout)
        assert torch.equal(int4pack.int4pack_to_codes(packed, rows, cols, layout), codes)


def test_a_converter_in_another_learnable_layout_is_learned(monkeypatch):
    layout = _random_layout(32, 7)
    monkeypatch.setattr(int4pack, "_torch_convert", lambda codes: _pack(codes, layout))
    learned, why = int4pack._learn_layout()
    assert why == "" and learned == layout
    # torch's own kernel reads torch's layout, not this one: the matmul probe must refuse it.
    probe = _fresh_probe()
    assert not probe.ok and "int4 matmul is off the reference" in probe.reason
    described = probe.describe()
    assert described.startswith("int4pack off on TEST") and "unpack-matmul" in described


def test_a_converter_outside_the_family_turns_int4pack_off(monkeypatch):
    real = int4pack._torch_convert

    def scrambled(codes):
        # Reverse the bytes of the whole output: no row-block layout predicts that.
        return real(codes).reshape(-1).flip(0).reshape(codes.shape[0], -1)

    monkeypatch.setattr(int4pack, "_torch_convert", scrambled)
    probe = _fresh_probe()
    assert not probe.ok and probe.layout is None
    assert "layout" in probe.reason


def test_a_failing_torch_kernel_turns_int4pack_off(monkeypatch):
    def broken(codes):
        raise RuntimeError("this CPU has no int4 kernel\nsecond line")

    monkeypatch.setattr(int4pack, "_torch_convert", broken)
    probe = _fresh_probe()
    assert not probe.ok
    assert probe.reason == "torch's int4 kernels failed: this CPU has no int4 kernel"


def test_a_failed_probe_keeps_layers_off_int4pack(monkeypatch):
    failed = int4pack.Int4PackProbe("TEST", None, False, "made to fail", 0.0)
    monkeypatch.setattr(cpu, "int4pack_probe", lambda: failed)
    reason = cpu.int4pack_unsupported(4, 64, 64, 256)
    assert reason == failed.describe() and "made to fail" in reason
    # The reasons that do not depend on the CPU come first, without running the probe.
    assert "not 3-bit" in cpu.int4pack_unsupported(3, 64, 64, 256)


def test_a_weight_the_layout_mispredicts_is_refused_not_misread():
    probe = int4pack.int4pack_probe()
    wrong = _random_layout(probe.layout.block_rows, 3)
    codes = torch.randint(0, 16, (probe.layout.block_rows, 64), dtype=torch.uint8)
    with pytest.raises(BitallocError, match="layout its probe did not predict"):
        int4pack.codes_to_int4pack(codes, wrong)
    with pytest.raises(BitallocError, match="cannot hold"):
        int4pack.int4pack_to_codes(torch.zeros(16, 3, dtype=torch.uint8), 16, 8)
