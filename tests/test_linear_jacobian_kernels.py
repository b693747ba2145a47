"""The numba kernels of ``linear-jacobian`` (:mod:`recurjac_scale.jacobian.linear_kernels`) against the numpy
formulas they replace: the same coefficients (bitwise: one product per entry), the same row sums up to summation
order, and NaN coefficients (overflow upstream) carried into every output instead of being dropped."""

from __future__ import annotations

import numpy as np
import pytest

from recurjac_scale.jacobian.linear_kernels import plane_lines_step, relax_step


def _coeffs(rng, K, d):
    """Coefficients with exact zeros, both signs and a spread of magnitudes."""
    A = rng.standard_normal((K, d)) * 10.0 ** rng.integers(-3, 4, (K, d))
    A[rng.random((K, d)) < 0.2] = 0.0
    return A


def _close(a, b):
    # sums of at most 60 terms in another order: well inside 1e-13 relative to the sum of magnitudes
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-300)


def _plane_lines(rng, K, d, V):
    Lam = _coeffs(rng, K, d)
    planes = [rng.standard_normal(d) for _ in range(6)]
    ymax, vnext = rng.random(d), rng.random(d)
    S_up, S_low, T_up, T_low = (rng.standard_normal((V, d)) for _ in range(4))
    S_up[0] = S_low[0] = 0.0  # variant 0: constant lines (not written)
    w = rng.random((V, d))
    slot = np.array([-1] + list(range(V - 1)), dtype=np.int64)
    return Lam, planes, ymax, vnext, (S_up, S_low, T_up, T_low, w), slot


def _run_plane_lines(Lam, planes, ymax, vnext, lines, slot):
    K, d = Lam.shape
    V = slot.size
    kappa, nus = np.empty((K, d)), np.empty((int((slot >= 0).sum()), K, d))
    term, ey, ek = np.empty(K), np.empty(K), np.empty(K)
    lterm, le, nnz = np.empty((V, K)), np.empty((V, K)), np.zeros(V, dtype=np.int64)
    plane_lines_step(Lam, *planes, ymax, vnext, *lines, slot, kappa, nus, term, ey, ek, lterm, le, nnz)
    return kappa, nus, term, ey, ek, lterm, le, nnz


@pytest.mark.parametrize("seed", [0, 1])
def test_plane_lines_step_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    K, d, V = 7, 60, 3
    Lam, planes, ymax, vnext, lines, slot = _plane_lines(rng, K, d, V)
    kappa, nus, term, ey, ek, lterm, le, nnz = _run_plane_lines(Lam, planes, ymax, vnext, lines, slot)
    cgU, caU, ccU, cgL, caL, ccL = planes
    Lp, Ln = np.maximum(Lam, 0.0), np.minimum(Lam, 0.0)
    np.testing.assert_array_equal(kappa, Lp * cgU + Ln * cgL)
    _close(term, Lp @ ccU + Ln @ ccL)
    _close(ey, np.abs(Lam) @ ymax)
    _close(ek, np.abs(Lp * cgU + Ln * cgL) @ vnext)
    mu = Lp * caU + Ln * caL
    mp, mn = np.maximum(mu, 0.0), np.minimum(mu, 0.0)
    S_up, S_low, T_up, T_low, w = lines
    for v in range(V):
        ref = mp * S_up[v] + mn * S_low[v]
        if slot[v] >= 0:
            np.testing.assert_array_equal(nus[slot[v]], ref)
            assert nnz[v] == np.count_nonzero(ref)
        else:
            assert nnz[v] == 0
        _close(lterm[v], mp @ T_up[v] + mn @ T_low[v])
        _close(le[v], np.abs(mu) @ w[v])


@pytest.mark.parametrize("V", [1, 3])
def test_plane_lines_select_form_equals_branch_form(V):
    """With finite planes and lines the kernel takes the sign choices as selects; its outputs must be bitwise those
    of the branch-per-sign form (which it falls back to for a NaN row, and for non-finite planes)."""
    from recurjac_scale.jacobian.linear_kernels import _plane_lines_rows

    rng = np.random.default_rng(5)
    K, d = 9, 70
    Lam, planes, ymax, vnext, lines, slot = _plane_lines(rng, K, d, V)
    Lam[4, 11] = np.nan
    fast = _run_plane_lines(Lam, planes, ymax, vnext, lines, slot)
    outs = [np.empty((K, d)), np.empty((int((slot >= 0).sum()), K, d)), np.empty(K), np.empty(K), np.empty(K),
            np.empty((V, K)), np.empty((V, K)), np.zeros(V, dtype=np.int64)]
    _plane_lines_rows(Lam, *planes, ymax, vnext, *lines, slot, *outs, 0, K)
    for a, b in zip(fast, outs):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(fast[2][4]) and np.isfinite(fast[2][[0, 8]]).all()
    planes[1][3] = np.inf  # a non-finite plane: the branch form throughout
    fast = _run_plane_lines(Lam, planes, ymax, vnext, lines, slot)
    outs[7] = np.zeros(V, dtype=np.int64)  # nnz is incremented
    _plane_lines_rows(Lam, *planes, ymax, vnext, *lines, slot, *outs, 0, K)
    for a, b in zip(fast, outs):
        np.testing.assert_array_equal(a, b)


def _relax_case(rng, K, n, with_nu):
    kept = np.sort(rng.choice(n, size=n - 9, replace=False))
    act = np.sort(rng.choice(n, size=n - 5, replace=False)).astype(np.int64)
    pos = np.full(n, -1, dtype=np.int64)
    pos[kept] = np.arange(kept.size)
    Hc = _coeffs(rng, K, kept.size)
    nu = _coeffs(rng, K, n) if with_nu else np.empty((0, 0))
    vecs = [rng.standard_normal(n) for _ in range(4)] + [rng.random(n) for _ in range(3)] + [
        rng.standard_normal(n), rng.random(n)]
    return Hc, pos, kept, act, nu, vecs


@pytest.mark.parametrize("with_nu", [False, True])
def test_relax_step_matches_numpy(with_nu):
    rng = np.random.default_rng(3)
    K, n = 6, 50
    Hc, pos, kept, act, nu, vecs = _relax_case(rng, K, n, with_nu)
    a_up, a_low, b_up, b_low, r_up, r_low, zmax, bnext, wnext = vecs
    # nu kept on a subset of the neurons (the live ones), zero elsewhere
    live = np.sort(rng.choice(n, size=n - 7, replace=False))
    nupos = np.full(n, -1, dtype=np.int64)
    nupos[live] = np.arange(live.size)
    nu_live = np.ascontiguousarray(nu[:, live]) if with_nu else nu
    Gact, out = np.empty((K, act.size)), np.empty((5, K))
    relax_step(Hc, pos, nu_live, nupos, with_nu, a_up, a_low, b_up, b_low, r_up, r_low, zmax, bnext, wnext, act,
               Gact, out)
    Gh = np.zeros((K, n))
    Gh[:, kept] = Hc
    Gp, Gn = np.maximum(Gh, 0.0), np.minimum(Gh, 0.0)
    Gam = Gp * a_up + Gn * a_low
    if with_nu:
        nu_full = np.zeros((K, n))
        nu_full[:, live] = nu[:, live]
        Gam = Gam + nu_full
    np.testing.assert_array_equal(Gact, Gam[:, act])
    _close(out[0], Gp @ b_up + Gn @ b_low)
    _close(out[1], Gp @ r_up - Gn @ r_low)
    _close(out[2], np.abs(Gam) @ zmax)
    _close(out[3], Gam @ bnext)
    _close(out[4], np.abs(Gam) @ wnext)


def test_kernels_carry_nan():
    """A NaN coefficient must reach the constants (the caller turns a NaN bound into +inf); dropping it as if it
    were zero would leave a finite bound that misses the term."""
    rng = np.random.default_rng(4)
    K, d, V = 3, 20, 2
    Lam, planes, ymax, vnext, lines, slot = _plane_lines(rng, K, d, V)
    Lam[1, 4] = np.nan
    kappa, nus, term, ey, ek, lterm, le, nnz = _run_plane_lines(Lam, planes, ymax, vnext, lines, slot)
    assert np.isnan(term[1]) and np.isnan(kappa[1, 4]) and np.isnan(nus[0, 1, 4])
    assert np.isnan(lterm[:, 1]).all() and np.isfinite(lterm[:, [0, 2]]).all()
    assert np.isfinite(term[[0, 2]]).all()

    Hc, pos, kept, act, _, vecs = _relax_case(rng, K, 50, False)
    Hc[2, 7] = np.nan
    Gact, out = np.empty((K, act.size)), np.empty((5, K))
    relax_step(Hc, pos, np.empty((0, 0)), np.full(50, -1, dtype=np.int64), False, *vecs, act, Gact, out)
    assert np.isnan(out[0, 2]) and np.isfinite(out[0, [0, 1]]).all()


def _ys(netc, X, start):
    """``y(start) = ∂f_0/∂z(start)`` at the points ``X`` (first output row of ``netc``), shape ``(n, d_start)``."""
    zs = netc.pre_activations(X)
    H = netc.n_layers
    g = np.repeat(np.asarray(netc.weights[H - 1], np.float64)[:1], X.shape[0], axis=0)
    y = None
    for k in range(H - 2, start - 1, -1):
        y = g * netc.activations[k].derivative(zs[k])
        g = y @ np.asarray(netc.weights[k], np.float64)
    return y


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
@pytest.mark.parametrize("start", [0, 1])
def test_every_variant_bounds_objectives_alone(act, start, rng):
    """Each slope variant of the propagation (not only the minimum over them, and without the intersection with
    RecurJac-B that can hide an unsound network pass) bounds the Jacobian entries' and random objectives over
    sampled and hill-climbed points."""
    from recurjac_scale.jacobian import derivative_bounds_for, jacobian_bounds
    from recurjac_scale.jacobian import linear as lin
    from recurjac_scale.layer_bounds.base import Region
    from recurjac_scale.testing import hill_climb, random_network, sample_region

    net = random_network((6, 24, 24, 24, 3), act, rng)
    x0 = rng.uniform(0, 1, 6)
    eps = 0.15
    jb = jacobian_bounds(net, x0, eps, np.inf, method="recurjac-b", outputs=0)
    netc = net.with_outputs(np.eye(3)[:1])
    region = Region.of(netc, x0, eps, np.inf)
    ctx = lin.linear_context(netc, region, jb.layer_bounds, derivative_bounds_for(netc, jb.layer_bounds))
    assert np.count_nonzero(ctx.dl[1] < ctx.du[1]) >= 4 if act == "relu" else True
    H = ctx.H
    gl = [np.asarray(jb.states[H - 2 - k]["lower"][0], np.float64) for k in range(H - 1)]
    gu = [np.asarray(jb.states[H - 2 - k]["upper"][0], np.float64) for k in range(H - 1)]
    rb = lin.row_bounds(ctx, 0, gl, gu, lin.centre_gradients_ctx(ctx)[0])
    W = np.asarray(netc.weights[start], np.float64)
    Lam = np.vstack([W.T, -W.T, rng.standard_normal((10, W.shape[0]))])
    X = sample_region(region, 3000, rng)
    for q in range(0, Lam.shape[0], 3):
        X = np.vstack([X, hill_climb(region, lambda Z, q=q: _ys(netc, Z, start) @ Lam[q], rng, starts=2, steps=25,
                                     population=8)])
    reached = (_ys(netc, X, start) @ Lam.T).max(axis=0)
    for v in ctx.variants:
        ub = lin.bound_objectives(ctx, rb, Lam, start, v)
        assert (ub >= reached).all(), (v, np.flatnonzero(ub < reached))


@pytest.mark.parametrize("eps, skips", [(0.02, False), (0.3, True)])
def test_adaptive_skip_of_slope_variants(eps, skips):
    """``LinearContext.adaptive``: once that many objectives of a row were bounded with every variant and the lines
    with slopes never won, the row's later objectives run with constant lines only.  On the 16-16-16-10 recipe the
    slopes win some objectives at eps 0.02 (no skip) and none at eps 0.3 (skip); the bounds equal those of the
    run without skipping either way."""
    from recurjac_scale.jacobian import derivative_bounds_for, jacobian_bounds
    from recurjac_scale.jacobian import linear as lin
    from recurjac_scale.layer_bounds.base import Region
    from recurjac_scale.testing import random_network

    rng = np.random.default_rng(0)
    net = random_network((16, 16, 16, 10), "relu", rng)
    x0 = rng.uniform(0, 1, 16)
    jb = jacobian_bounds(net, x0, eps, np.inf, method="recurjac-b", outputs=1)
    netc = net.with_outputs(np.eye(10)[1:2])
    region = Region.of(netc, x0, eps, np.inf)
    db = derivative_bounds_for(netc, jb.layer_bounds)
    full = lin.entry_bounds(lin.linear_context(netc, region, jb.layer_bounds, db, adaptive=0), jb.states, jb.lower,
                            jb.upper, block=4)
    fast = lin.entry_bounds(lin.linear_context(netc, region, jb.layer_bounds, db, adaptive=8), jb.states, jb.lower,
                            jb.upper, block=4)
    np.testing.assert_array_equal(fast[0], full[0])
    np.testing.assert_array_equal(fast[1], full[1])
    counted, wins = fast[3][0].slope_stats
    total = full[3][0].slope_stats[0]  # every objective with a slope variant counted when nothing is skipped
    assert (wins == 0) == skips
    assert (counted < total) == skips


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_first_layer_fold_equals_the_unfolded_pass(act):
    """The first hidden layer's exact-line neurons folded into one GEMM (:mod:`recurjac_scale.jacobian.
    linear_collapse`) give the bounds of the unfolded network pass up to rounding (its allowance differs, by far less
    than 1e-10 relative here), for entry objectives and random ones, in every variant."""
    from recurjac_scale.jacobian import derivative_bounds_for, jacobian_bounds
    from recurjac_scale.jacobian import linear as lin
    from recurjac_scale.layer_bounds.base import Region
    from recurjac_scale.testing import random_network

    rng = np.random.default_rng(0)
    kw = {"alpha": 0.1} if act == "leaky_relu" else {}
    net = random_network((20, 64, 32, 16, 3), act, rng, **kw)
    x0 = rng.uniform(0, 1, 20)
    eps = 0.05
    jb = jacobian_bounds(net, x0, eps, np.inf, method="recurjac-b", outputs=0)
    netc = net.with_outputs(np.eye(3)[:1])
    ctx = lin.linear_context(netc, Region.of(netc, x0, eps, np.inf), jb.layer_bounds,
                             derivative_bounds_for(netc, jb.layer_bounds), adaptive=0)
    from recurjac_scale.jacobian.linear_passes import dense_blocks

    assert dense_blocks(ctx)["fold"] is not None
    assert np.count_nonzero(ctx.dl[0] < ctx.du[0]) >= 5
    H = ctx.H
    gl = [np.asarray(jb.states[H - 2 - k]["lower"][0], np.float64) for k in range(H - 1)]
    gu = [np.asarray(jb.states[H - 2 - k]["upper"][0], np.float64) for k in range(H - 1)]
    rb = lin.row_bounds(ctx, 0, gl, gu, lin.centre_gradients_ctx(ctx)[0])
    W0 = np.asarray(netc.weights[0], np.float64)
    Lam = np.vstack([W0.T, -W0.T, rng.standard_normal((8, W0.shape[0]))])
    folded = lin.bound_objectives_variants(ctx, rb, Lam, 0)
    ctx.compact["fold"] = None
    plain = lin.bound_objectives_variants(ctx, rb, Lam, 0)
    assert np.isfinite(plain).all()
    np.testing.assert_allclose(folded, plain, rtol=1e-10, atol=0)
