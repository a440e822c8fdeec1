"""The reference hash grid's written-out backward (``encoding.HashGridLookup``) against autograd through the same
math (``hash_grid_features`` run eagerly), hand values, and what it keeps for the backward (issue 26: the
reference's time and memory went into autograd's graph over every level's gathers)."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.scene.encoding import CORNERS, HashGridEncoding, hash_grid_features

# two dense levels and two hashed ones (a 2^7 table): both indexings, the progressive band and hash collisions
ARGS = (4, 2, 7, 3, 1.5)


@pytest.fixture()
def encoding():
    torch.manual_seed(0)
    enc = HashGridEncoding(*ARGS)
    with torch.no_grad():
        enc.params.normal_(0, 0.3)
    assert enc.hashed == [False, False, True, True]
    return enc


def autograd_features(enc, x):
    """The same encoding, differentiated by autograd through the gathers (the former reference)."""
    out = hash_grid_features(x, enc.params, None, CORNERS, enc.level_specs()[:enc.active_levels], enc.n_features)
    missing = (enc.n_levels - enc.active_levels) * enc.n_features
    return torch.cat([out, x.new_zeros(x.shape[0], missing)], -1) if missing else out


def loss_and_grads(fn, enc, x, normals):
    """Features, parameter gradient and, with ``normals``, the point gradient and the parameter gradient of a
    loss that includes the squared point gradient (second order, as analytic normals in a training step)."""
    enc.params.grad = None
    x = x.clone().requires_grad_(normals)
    y = fn(x)
    loss = (y * torch.linspace(-1, 2, y.shape[1])).sin().sum()
    gx = None
    if normals:
        gx = torch.autograd.grad(y.square().sum(), x, create_graph=True)[0]
        loss = loss + gx.square().sum()
    loss.backward()
    return y.detach(), enc.params.grad.clone(), None if gx is None else gx.detach()


@pytest.mark.parametrize("active", [4, 2])
@pytest.mark.parametrize("normals", [False, True])
def test_written_backward_matches_autograd(encoding, active, normals):
    encoding.set_active_levels(active)
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(1))
    ours = loss_and_grads(encoding, encoding, x, normals)
    theirs = loss_and_grads(lambda p: autograd_features(encoding, p), encoding, x, normals)
    for a, b, what in zip(theirs, ours, ("features", "parameter gradient", "point gradient")):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item(), msg=what)
    inactive = slice(encoding.offsets[active] * 2, None)
    assert torch.count_nonzero(ours[1][inactive]) == 0  # levels outside the band get no gradient
    with torch.no_grad():
        torch.testing.assert_close(encoding(x), ours[0])


def test_hand_values_of_a_dense_level():
    enc = HashGridEncoding(1, 1, 19, 3, 2.0)  # one level: scale 2, resolution 3, 27 entries (32 with padding)
    with torch.no_grad():
        enc.params.copy_(torch.arange(32.0))  # entry i holds i: the feature is the interpolated dense index
    x = torch.tensor([[0.25, 0.5, 0.6]], requires_grad=True)  # pos = 2x + 0.5 = (1.0, 1.5, 1.7): cell (1, 1, 1)
    y = enc(x)
    # index = ix + 3 iy + 9 iz is affine in the cell coordinates, so interpolation gives 1 + 3·1.5 + 9·1.7
    assert y.item() == pytest.approx(1.0 + 4.5 + 15.3)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad[0].tolist() == pytest.approx([2.0, 6.0, 18.0])  # d index / d x = scale · (1, 3, 9)


def test_point_gradient_is_the_finite_difference_within_a_cell(encoding):
    x = torch.tensor([[0.31, 0.62, 0.47]], dtype=torch.float64)
    enc = encoding.double()
    w = torch.linspace(-1, 1, enc.n_output_dims, dtype=torch.float64)
    (grad,) = torch.autograd.grad((enc(x.requires_grad_()) * w).sum(), x)
    eps = 1e-7
    with torch.no_grad():
        fd = [((enc(x + eps * e) - enc(x - eps * e)) * w).sum() / (2 * eps) for e in torch.eye(3, dtype=x.dtype)]
    assert grad[0].tolist() == pytest.approx([v.item() for v in fd], rel=1e-5)


def saved_bytes(fn, x):
    """Bytes autograd keeps for the backward of ``fn(x)`` with analytic-normal style second order."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = x.clone().requires_grad_(True)
        y = fn(x)
        gx = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        (y.sum() + gx.square().sum()).backward()
    return total[0]


def test_the_reference_keeps_the_points_and_the_jacobian_only():
    enc = HashGridEncoding(16, 2, 19, 16, 1.447269237440378)  # csd-coarse's grid
    n = 2000
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(2))
    ours = saved_bytes(enc, x)
    theirs = saved_bytes(lambda p: autograd_features(enc, p), x)
    per_point = ours / n
    # the points (12 B) and the Jacobian [32, 3] (384 B), twice at most (the normal's graph holds its own copy)
    assert per_point <= 2 * (12 + 32 * 3 * 4) + 64, per_point
    assert theirs / ours > 5, (theirs, ours)  # autograd through the gathers kept several KB a point
    assert math.isfinite(per_point)
