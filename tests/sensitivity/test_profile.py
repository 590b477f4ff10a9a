import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.sensitivity import Profile, make_profiler


def _profile():
    return Profile(("a", "b"), ("int2-g32", "fp16"), np.array([[1.5, 0.0], [2.5, 1e-9]]), {"k": 1})


def test_safetensors_keeps_the_table_bit_exact(tmp_path):
    prof = _profile().with_metadata(method="fisher", tokens=3)
    prof.save(tmp_path / "p.safetensors")
    again = Profile.load(tmp_path / "p.safetensors")
    assert again.loss.dtype == np.float64
    np.testing.assert_array_equal(again.loss, prof.loss)
    assert again.metadata == {"k": 1, "method": "fisher", "tokens": 3}
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_unreadable_profile_files_raise(tmp_path):
    bad = tmp_path / "p.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(BitallocError, match="not a bitalloc profile"):
        Profile.load(bad)
    with pytest.raises(BitallocError, match="does not exist"):
        Profile.load(tmp_path / "missing.safetensors")
    with pytest.raises(BitallocError, match="does not exist"):
        Profile.load(tmp_path / "missing.json")


def test_unknown_profiler_or_option_raises():
    with pytest.raises(BitallocError, match="unknown profiler 'fishy'; choose one of"):
        make_profiler("fishy")
    with pytest.raises(BitallocError, match="profiler 'output'.*probes"):
        make_profiler("output", probes=3)
