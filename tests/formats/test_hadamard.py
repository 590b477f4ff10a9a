"""The seeded block-diagonal Hadamard rotation: block sizes, orthogonality, the fast transform
against the explicit matrix, inverses, outlier spreading, and the rotated importances."""

from __future__ import annotations

import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.hadamard import (
    MAX_BLOCK,
    Rotation,
    block_size,
    fwht,
    hadamard_matrix,
    rotate,
    rotate_weight,
    unrotate,
    unrotate_weight,
)

WIDTHS = [8, 40, 96, 200, 576, 1536]


@pytest.mark.parametrize(
    ("width", "block"),
    [(8, 8), (40, 8), (96, 32), (200, 8), (576, 64), (1536, 256), (4096, 256), (11008, 256)],
)
def test_the_block_is_the_largest_power_of_two_dividing_the_width_up_to_the_cap(width, block):
    assert block_size(width) == block == Rotation(width).block
    assert width % block == 0 and block <= MAX_BLOCK


@pytest.mark.parametrize("width", [27, 12, 100, 4, 2, 1, 4 * 101])
def test_a_width_that_cannot_be_blocked_raises_naming_it(width):
    with pytest.raises(BitallocError, match=rf"input width of {width} .*divisible by 8"):
        block_size(width)
    with pytest.raises(BitallocError, match=str(width)):
        Rotation(width)


@pytest.mark.parametrize("bad", [0, -8, 8.0, True])
def test_bad_widths_and_seeds_raise(bad):
    with pytest.raises(BitallocError, match="width"):
        block_size(bad)
    with pytest.raises(BitallocError, match="seed"):
        Rotation(64, seed=-1 if bad == 0 else bad)


def test_hadamard_matrix_is_sylvester_and_orthogonal_up_to_scale():
    h2 = hadamard_matrix(2)
    assert torch.equal(h2, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    h8 = hadamard_matrix(8)
    assert torch.equal(h8, torch.kron(h2, hadamard_matrix(4)))
    assert torch.equal(h8 @ h8.T, 8 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(BitallocError, match="power-of-two"):
        hadamard_matrix(12)


@pytest.mark.parametrize("width", WIDTHS)
def test_r_is_orthogonal_with_random_signs_and_hadamard_blocks(width):
    rotation = Rotation(width, seed=5)
    r = rotation.matrix()
    eye = torch.eye(width, dtype=torch.float64)
    assert torch.allclose(r @ r.T, eye, atol=1e-12) and torch.allclose(r.T @ r, eye, atol=1e-12)
    signs = rotation.signs()
    assert set(signs.tolist()) == {-1.0, 1.0} and signs.shape == (width,)
    b = rotation.block
    # Outside the diagonal blocks R is zero; inside, every entry is ±1/sqrt(b).
    mask = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool)] * (width // b))
    assert not bool(r[~mask].any())
    assert torch.allclose(r[mask].abs(), torch.full_like(r[mask], 1 / math.sqrt(b)))


@pytest.mark.parametrize("width", WIDTHS)
def test_the_fast_transform_equals_the_explicit_matrix(width):
    rotation = Rotation(width, seed=3)
    r = rotation.matrix()
    x = torch.randn(3, 5, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rotation.apply(x), x @ r, atol=1e-12)
    assert torch.allclose(rotation.invert(x), x @ r.T, atol=1e-12)
    # Unnormalised blocks: the transform is x_block @ H_b.
    h = hadamard_matrix(rotation.block)
    blocks = x.reshape(-1, rotation.block)
    assert torch.allclose(fwht(x, rotation.block).reshape(-1, rotation.block), blocks @ h)


def test_rotating_then_unrotating_gives_the_weight_back():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 576, generator=gen)
    rotated = rotate_weight(w, seed=11)
    assert rotated.shape == w.shape and rotated.dtype == w.dtype
    assert not torch.allclose(rotated, w)
    assert torch.allclose(unrotate_weight(rotated, seed=11), w, atol=1e-5)
    # The rotation is orthogonal: the products the model computes are unchanged.
    x = torch.randn(7, 576, generator=gen)
    assert torch.allclose(rotate(x, 11) @ rotated.T, x @ w.T, atol=1e-4)
    assert torch.allclose(unrotate(rotate(x, 11), 11), x, atol=1e-5)
    # Half precision in, half precision out (computed in float32).
    half = w.to(torch.bfloat16)
    assert rotate_weight(half, 11).dtype == torch.bfloat16
    with pytest.raises(BitallocError, match="2-D"):
        rotate_weight(torch.randn(2, 3, 8))
    with pytest.raises(BitallocError, match="last dimension is 64"):
        Rotation(64).apply(torch.randn(3, 32))
    with pytest.raises(BitallocError, match="floating-point"):
        Rotation(8).apply(torch.ones(2, 8, dtype=torch.int64))


def test_seeds_are_deterministic_and_differ():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rotate_weight(w, 7), rotate_weight(w.clone(), 7))
    assert torch.equal(Rotation(256, 7).signs(), Rotation(256, 7).signs())
    assert not torch.equal(Rotation(256, 7).signs(), Rotation(256, 8).signs())
    assert not torch.allclose(rotate_weight(w, 7), rotate_weight(w, 8))
    # Applying twice leaves the input as it was (no in-place use of it or of cached signs).
    before = w.clone()
    rotate_weight(w, 7)
    assert torch.equal(w, before) and torch.equal(rotate_weight(w, 7), rotate_weight(w, 7))


def test_a_huge_outlier_column_is_spread():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 512, generator=gen) * 0.02
    w[:, 100] *= 200  # one input channel far larger than the rest

    def peak(m: torch.Tensor) -> float:
        return float(m.abs().max() / m.square().mean().sqrt())

    rotated = rotate_weight(w, 0)
    assert peak(rotated) < peak(w) / 4
    # The outlier's energy spread over its whole block (256 columns), not kept in one.
    energy = rotated.square().sum(0)
    assert float(energy.max() / energy.sum()) < 0.02 < float(w.square().sum(0).max() / energy.sum())


def test_rotated_importances_match_rotating_them_explicitly():
    width = 96
    rotation = Rotation(width, seed=9)
    r = rotation.matrix()
    gen = torch.Generator().manual_seed(6)
    v = torch.rand(width, generator=gen, dtype=torch.float64) * 3
    explicit = r.T @ torch.diag(v) @ r
    assert torch.allclose(rotation.conjugate_diagonal(v), torch.diagonal(explicit))
    x = torch.randn(200, width, generator=gen, dtype=torch.float64)
    gram = x.T @ x / 200
    assert torch.allclose(rotation.conjugate_gram(gram), r.T @ gram @ r, atol=1e-12)
    # The Gram of the rotated inputs, as the quantizer of W R needs.
    rotated = rotation.apply(x)
    assert torch.allclose(rotation.conjugate_gram(gram), rotated.T @ rotated / 200, atol=1e-12)
    with pytest.raises(BitallocError, match=r"\(96, 96\)"):
        rotation.conjugate_gram(torch.eye(64))
    with pytest.raises(BitallocError, match=r"\(96,\)"):
        rotation.conjugate_diagonal(torch.ones(64))
