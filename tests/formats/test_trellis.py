"""Trellis-coded quantization (``tcq{k}-l{L}``): the Viterbi search finds the least-error path
(brute force on a small trellis), error falls as bits rise, Gaussian data lands within 1.5x of
the distortion-rate bound, the stored form decodes to the same weight at the exact bits, and
bad input is refused."""

from __future__ import annotations

import itertools

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.formats.trellis import TrellisFormat, trellis_codebook, viterbi


def gaussian(out: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


def path_error(x, weights, book, states):
    return float(((x - book[states]).square() * weights).sum())


def test_viterbi_finds_the_least_error_path_of_a_small_trellis():
    state_bits, step_bits, steps = 4, 2, 5
    book = trellis_codebook(state_bits)
    x = gaussian(3, steps)
    weights = torch.rand(steps, generator=torch.Generator().manual_seed(1)) + 0.1
    found = viterbi(x, weights, book, step_bits)
    for row in range(3):
        best = float("inf")
        for first in range(16):
            for bits in itertools.product(range(4), repeat=steps - 1):
                states, state = [first], first
                for b in bits:
                    state = ((state << step_bits) | b) & 15
                    states.append(state)
                err = path_error(x[row], weights, book, torch.tensor(states))
                best = min(best, err)
        path = found[row]
        # The path is a real trellis path, and no path has less error.
        for t in range(1, steps):
            assert path[t] >> step_bits == path[t - 1] & 3
        assert path_error(x[row], weights, book, path) == pytest.approx(best, rel=1e-6)


def test_codebook_is_a_permutation_of_gaussian_quantiles():
    book = trellis_codebook(8)
    assert book.shape == (256,) and len(set(book.tolist())) == 256
    assert abs(float(book.mean())) < 1e-6 and float(book.std()) == pytest.approx(1.0, abs=0.03)
    # Neighbouring states take values from all over the range (no sorted runs).
    assert float(book[:16].std()) > 0.5
    assert torch.equal(book, trellis_codebook(8))


def test_gaussian_data_within_one_and_a_half_of_the_bound_and_error_falls_with_bits():
    w = gaussian(96, 512)
    errors = []
    for bits in (2, 3, 4):
        fmt = TrellisFormat(bits, 10)
        rate = fmt.storage_bits(w.shape) / w.numel()
        mse = float((fmt.fake_quantize(w) - w).square().mean())
        errors.append(mse)
        if bits < 4:
            assert mse / 2 ** (-2 * rate) < 1.5, fmt.name
    assert errors[0] > errors[1] > errors[2]
    # More states, less error at the same bits.
    eight = float((TrellisFormat(2, 8).fake_quantize(w) - w).square().mean())
    assert eight > errors[0]


def test_exact_bits_and_stored_form_decode_to_the_weight():
    w = gaussian(5, 72) * 0.03
    w[2] = 0.0
    for name in ("tcq2-l8", "tcq3-l10", "tcq4-l8"):
        fmt = parse_format(name)
        assert fmt.storage_bits(w.shape) == 5 * (fmt.state_bits + 71 * fmt.bits + 16)
        encoded = fmt.encode(w)
        assert encoded.bits == fmt.storage_bits(w.shape)
        q = fmt.fake_quantize(w)
        assert torch.equal(fmt.decode(encoded), q)
        assert torch.equal(q[2], torch.zeros(72)), "a zero row stays zero"
        assert q.dtype == w.dtype


def test_importance_lowers_the_weighted_error():
    w = gaussian(32, 128)
    importance = torch.ones(128)
    importance[:16] = 50.0
    fmt = TrellisFormat(2, 8)

    def weighted(q):
        return float(((q - w).square() * importance).sum())

    assert weighted(fmt.fake_quantize(w, importance)) < weighted(fmt.fake_quantize(w))
    # A Gram matrix is read by its diagonal; all-zero importance is the plain error.
    gram = torch.diag(importance)
    assert torch.equal(fmt.fake_quantize(w, gram), fmt.fake_quantize(w, importance))
    assert torch.equal(fmt.fake_quantize(w, torch.zeros(128)), fmt.fake_quantize(w))


@pytest.mark.parametrize(
    "name, match",
    [
        ("tcq5-l10", "unsupported bits"),
        ("tcq2-l9", "unsupported state bits"),
        ("tcq1-l8", "unsupported bits"),
    ],
)
def test_bad_names_say_what_to_change(name, match):
    with pytest.raises(BitallocError, match=match):
        parse_format(name)


def test_non_finite_weights_are_refused():
    w = gaussian(2, 16)
    w[0, 3] = float("nan")
    with pytest.raises(BitallocError, match="NaN or inf"):
        TrellisFormat(2, 8).fake_quantize(w)


def test_rotation_wraps_it():
    w = gaussian(8, 128)
    rotated = parse_format("tcq2-l8+rht")
    assert rotated.storage_bits(w.shape) == TrellisFormat(2, 8).storage_bits(w.shape)
    assert rotated.fake_quantize(w).shape == w.shape
