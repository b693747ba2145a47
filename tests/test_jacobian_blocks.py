"""The block interface of the Jacobian methods: chain construction, block invariance (bitwise), per-row operands,
and agreement with an independent plain transcription of ALGORITHM.md (recursion per row, two chains, the E_j
rule), written here from the page, not from the package."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.jacobian import (
    JACOBIAN_METHODS,
    Chain,
    derivative_bounds_for,
    get_jacobian_method,
    jacobian_bounds,
    run_chain,
    top_state,
)
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network

METHODS = sorted(JACOBIAN_METHODS)


# -- an independent transcription of ALGORITHM.md ------------------------------------------------------------------


def _naive_bound(A, mats, dl, du, Ls, Us, m, V, j):
    """Row j of ``bound(m, V)`` on a chain, by plain recursion (ALGORITHM.md, ComputeLU), no rounding allowance.

    ``A`` = top (R, d_1); ``mats[i]`` = M_{i+1}; ``dl[i]``, ``du[i]`` = Σ_{i+1}; ``Ls[s]``, ``Us[s]`` = bounds of
    P_s (R, d_{s+1}); ``m`` = level (1-based: bounds ``P_{m-1} Σ_m V``).  Returns (upper row, lower row) of shape (c,).
    """
    lo, hi = dl[m - 1], du[m - 1]
    Vp, Vn = np.maximum(V, 0), np.minimum(V, 0)
    if m == 1:
        a = A[j]
        ap, an = np.maximum(a, 0), np.minimum(a, 0)
        U = (ap * hi) @ Vp + (an * hi) @ Vn + (ap * lo) @ Vn + (an * lo) @ Vp
        L = (ap * lo) @ Vp + (an * lo) @ Vn + (ap * hi) @ Vn + (an * hi) @ Vp
        return U, L
    Lm, Um = Ls[m - 1][j], Us[m - 1][j]
    E = lo == hi
    I = (Lm < 0) & (Um > 0) & ~E
    P = (Lm >= 0) & ~E
    N = (Um <= 0) & ~P & ~E
    p = (P | E).astype(float)  # E counted in P: dl == du makes the choice moot
    n = N.astype(float)
    mi = I.astype(float)
    U_I = (mi * Um * hi) @ Vp + (mi * Lm * hi) @ Vn
    L_I = (mi * Lm * hi) @ Vp + (mi * Um * hi) @ Vn
    M = mats[m - 2]
    W_hat = M @ ((p * hi + n * lo)[:, None] * Vp + (p * lo + n * hi)[:, None] * Vn)
    W_til = M @ ((p * lo + n * hi)[:, None] * Vp + (p * hi + n * lo)[:, None] * Vn)
    U_II, _ = _naive_bound(A, mats, dl, du, Ls, Us, m - 1, W_hat, j)
    _, L_II = _naive_bound(A, mats, dl, du, Ls, Us, m - 1, W_til, j)
    return U_I + U_II, L_I + L_II


def naive_chain_bounds(chain: Chain):
    """Bounds of P_T for every row, by the plain recursion (driver of ALGORITHM.md)."""
    A = np.asarray(chain.top)
    mats = [np.asarray(m) for m in chain.mats]
    Ls, Us = [A], [A]
    for t in range(1, chain.n_steps + 1):
        rows = [_naive_bound(A, mats, chain.dl, chain.du, Ls, Us, t, mats[t - 1], j) for j in range(A.shape[0])]
        Us.append(np.array([r[0] for r in rows]))
        Ls.append(np.array([r[1] for r in rows]))
    return Ls[-1], Us[-1]


def _setup(act, widths, eps, p, rng, **kw):
    net = random_network(widths, act, rng, **kw)
    x0 = rng.uniform(-0.5, 0.5, widths[0])
    lb = layer_bounds(net, x0, eps, p, method="ibp")
    return net, x0, lb, derivative_bounds_for(net, lb)



def _magnitude_max(chain) -> float:
    """The largest entry of the magnitude chain ``|M_0| D(du_1) |M_1| ... D(du_T) |M_T|``: a scale that dominates
    every partial sum of the recursion (tolerances of the comparisons with plain transcriptions)."""
    m = np.abs(np.asarray(chain.top, dtype=np.float64))
    for M, du in zip(chain.mats, chain.du):
        m = (m * du[None, :]) @ np.abs(np.asarray(M, dtype=np.float64))
    return float(m.max())

@pytest.mark.parametrize("direction", ["backward", "f0", "f1"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "hard_sigmoid"])
def test_recurjac_matches_plain_transcription(act, direction, rng):
    kw = {"alpha": 0.3} if act == "leaky_relu" else {}
    for widths, eps in (([6, 9, 7, 8, 4], 0.05), ([5, 12, 10, 3], 0.2), ([7, 6, 5, 6, 5, 3], 0.02)):
        net, x0, lb, db = _setup(act, widths, eps, math.inf, rng, **kw)
        method = {"backward": "recurjac-b", "f0": "recurjac-f0", "f1": "recurjac-f1"}[direction]
        jm = get_jacobian_method(method)
        chain = jm.build_chain(net, db)
        lower, upper, states = run_chain(jm, chain)
        nl, nu = naive_chain_bounds(chain)
        # The package's intermediate states equal the plain recursion up to its rounding allowance.
        scale = 1.0 + _magnitude_max(chain)
        np.testing.assert_allclose(states[-1]["lower"], nl, rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(states[-1]["upper"], nu, rtol=0, atol=1e-12 * scale)
        if direction != "f1":
            ref_l, ref_u = (nl, nu) if direction == "backward" else (nl.T, nu.T)
            np.testing.assert_allclose(lower, ref_l, rtol=0, atol=1e-12 * scale)
            np.testing.assert_allclose(upper, ref_u, rtol=0, atol=1e-12 * scale)


def test_fastlip_matches_interval_recursion(rng):
    net, x0, lb, db = _setup("relu", [6, 9, 7, 8, 4], 0.1, math.inf, rng)
    res = jacobian_bounds(net, x0, 0.1, method="fastlip", layer_bounds=lb)
    # Fast-Lip by hand (Weng et al. 2018a): [L, U] <- hull([L, U] * [dl, du]) W, backward.
    ws = net.weights
    L = U = ws[-1]
    for k in range(len(ws) - 2, -1, -1):
        dl, du = db[k]
        lo = np.where(L >= 0, L * dl, L * du)
        hi = np.where(U >= 0, U * du, U * dl)
        W = ws[k]
        # interval product, term by term
        L = sum(np.minimum.reduce([lo[:, [r]] * W[r], hi[:, [r]] * W[r]]) for r in range(W.shape[0]))
        U = sum(np.maximum.reduce([lo[:, [r]] * W[r], hi[:, [r]] * W[r]]) for r in range(W.shape[0]))
    np.testing.assert_allclose(res.lower, L, rtol=0, atol=1e-12 * (1 + np.abs(L).max()))
    np.testing.assert_allclose(res.upper, U, rtol=0, atol=1e-12 * (1 + np.abs(U).max()))
    assert (res.lower <= L).all() and (res.upper >= U).all()


@pytest.mark.parametrize("eps", [0.003, 0.02, 0.08])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_block_invariance_bitwise(method, act, eps, rng):
    """Row and column blocks that do not divide the widths give bitwise identical bounds (and states).  The radii
    exercise every kernel variant: all rows dense, mostly dense, mostly compacted, vanished rows, sharing."""
    net = random_network([11, 13, 17, 9, 7], act, rng)
    x0 = rng.uniform(-0.5, 0.5, 11)
    ref = jacobian_bounds(net, x0, eps, method=method, layer_bounds="ibp")
    for rb, cb in ((1, 1), (2, 3), (4, 5), (5, None), (None, 7), (3, 2)):
        r = jacobian_bounds(net, x0, eps, method=method, layer_bounds="ibp", row_block=rb, col_block=cb)
        assert np.array_equal(r.lower, ref.lower) and np.array_equal(r.upper, ref.upper), (rb, cb)
        for s_ref, s in zip(ref.states, r.states):
            for k in ("lower", "upper", "allowance"):
                assert np.array_equal(s_ref[k], s[k]), (rb, cb, k)


def test_block_invariance_many_rows(rng):
    """F0 with more rows and columns than a GEMM panel: panels and tiles are exercised across block borders."""
    net = random_network([150, 140, 70, 5], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 150)
    ref = jacobian_bounds(net, x0, 0.01, method="recurjac-f0", layer_bounds="ibp")
    for rb, cb in ((37, 29), (130, None), (1, 70)):
        r = jacobian_bounds(net, x0, 0.01, method="recurjac-f0", layer_bounds="ibp", row_block=rb, col_block=cb)
        assert np.array_equal(r.lower, ref.lower) and np.array_equal(r.upper, ref.upper), (rb, cb)


def test_step_per_row_operand(rng):
    """A per-row V (Algorithm 2) gives, row by row, what the shared V gives, and sound bounds of P_{t-1} Σ_t V_j."""
    net = random_network([8, 10, 9, 7, 4], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 8)
    res = jacobian_bounds(net, x0, 0.1, method="recurjac-b", layer_bounds="ibp")
    chain, states = res.chain, res.states
    jm = get_jacobian_method("recurjac-b")
    T = chain.n_steps
    W1 = np.asarray(chain.mats[T - 1])  # (n_1, n_0)
    s = np.sign(rng.normal(size=(chain.n_rows, W1.shape[1])))
    Vj = np.einsum("rk,jk->jr", W1, s)[:, :, None]  # V_j = W(1) s_j, (R, d_T, 1)
    priors = [states[k] for k in range(T)]
    out = jm.step(chain, T, Vj, priors)
    # Shared operand, evaluated one row at a time, matches the per-row call for that row (bitwise).
    for j in range(chain.n_rows):
        one = jm.step(chain, T, Vj[j], [{k: v[j : j + 1] for k, v in st.items()} for st in priors])
        assert np.array_equal(one["upper"], out["upper"][j : j + 1])
        assert np.array_equal(one["lower"], out["lower"][j : j + 1])
    # Soundness: (J s)_j = (P_{T-1} Σ_T W1 s_j) lies in the bounds at points of the region.
    from recurjac_scale.layer_bounds import Region
    from recurjac_scale.testing import sample_region

    X = sample_region(Region.of(net, x0, 0.1), 500, rng)
    Js = np.einsum("kjn,jn->kj", net.jacobian(X), s)
    assert (Js <= out["upper"][:, 0] + 0).all() and (Js >= out["lower"][:, 0]).all()
    # and it is at least as tight as summing the element-wise bounds
    M_up = np.where(s > 0, res.upper, res.lower) * s
    assert (out["upper"][:, 0] <= M_up.sum(axis=1) + 1e-9).all()


def test_chain_shapes_and_top_state(rng):
    net = random_network([6, 8, 7, 5, 3], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 6)
    db = derivative_bounds_for(net, layer_bounds(net, x0, 0.1, method="ibp"))
    b = Chain.backward(net, db)
    assert b.n_steps == 3 and b.n_rows == 3 and b.widths == (5, 7, 8, 6) and b.output_shape == (3, 6)
    f0 = Chain.forward(net, db, start=0)
    assert f0.n_steps == 3 and f0.n_rows == 6 and f0.widths == (8, 7, 5, 3) and f0.output_shape == (3, 6)
    f1 = Chain.forward(net, db, start=1)
    assert f1.n_steps == 2 and f1.n_rows == 8 and f1.output_shape == (3, 6)
    st = top_state(b, slice(1, 3))
    assert np.array_equal(st["lower"], net.weights[-1][1:3]) and not st["allowance"].any()
    for name, jm in JACOBIAN_METHODS.items():
        assert jm.priors(3) == ((0, 1, 2) if jm.uses_all_priors else (2,))


def test_lazy_chain_matrices(rng):
    """The engine may hand zarr/dask-backed matrices: a chain of dask arrays gives the same result."""
    da = pytest.importorskip("dask.array")
    import dataclasses

    net = random_network([7, 9, 8, 4], "tanh", rng)
    x0 = rng.uniform(-0.5, 0.5, 7)
    db = derivative_bounds_for(net, layer_bounds(net, x0, 0.1, method="ibp"))
    jm = get_jacobian_method("recurjac-b")
    chain = jm.build_chain(net, db)
    lazy = dataclasses.replace(chain, top=da.from_array(chain.top, chunks=2), mats=tuple(da.from_array(m, chunks=3) for m in chain.mats))
    l1, u1, _ = run_chain(jm, chain)
    l2, u2, _ = run_chain(jm, lazy, row_block=3, col_block=4)
    assert np.array_equal(l1, l2) and np.array_equal(u1, u2)


# -- sharing across rows --------------------------------------------------------------------------------------------


@pytest.fixture(params=["never", "always"])
def sharing(request, monkeypatch):
    """Force the dense per-row recursion or the variant with sharing across rows (``recurjac_shared.SHARE_RATIO``)."""
    monkeypatch.setattr(
        "recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", 0.0 if request.param == "never" else math.inf
    )
    return request.param


@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0", "recurjac-f1"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "hard_sigmoid", "tanh"])
def test_sharing_matches_plain_transcription_and_contains(method, act, sharing, rng):
    """Both variants (dense per row, shared across rows) equal the plain recursion up to the rounding allowance,
    contain the exact Jacobian, and are bitwise blocking-invariant."""
    from recurjac_scale.layer_bounds import Region
    from recurjac_scale.testing import sample_region

    kw = {"alpha": 0.3} if act == "leaky_relu" else {}
    for widths, eps in (([9, 14, 12, 10, 4], 0.02), ([7, 10, 9, 8, 7, 3], 0.05)):
        net, x0, lb, db = _setup(act, widths, eps, math.inf, rng, **kw)
        jm = get_jacobian_method(method)
        chain = jm.build_chain(net, db)
        lower, upper, states = run_chain(jm, chain)
        nl, nu = naive_chain_bounds(chain)
        scale = 1.0 + _magnitude_max(chain)
        np.testing.assert_allclose(states[-1]["lower"], nl, rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(states[-1]["upper"], nu, rtol=0, atol=1e-12 * scale)
        l2, u2, _ = run_chain(jm, chain, row_block=3, col_block=2)
        assert np.array_equal(lower, l2) and np.array_equal(upper, u2)
        res = jacobian_bounds(net, x0, eps, method=method, layer_bounds=lb)
        X = sample_region(Region.of(net, x0, eps), 2000, rng)
        J = net.jacobian(X)
        assert ((J >= res.lower) & (J <= res.upper)).all()


def test_sharing_is_used_in_the_nearly_linear_regime(rng):
    import recurjac_scale.jacobian.recurjac as rj

    net = random_network([20, 30, 30, 30, 5], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 20)
    for eps, expected in ((1e-4, True), (1.0, False)):
        db = derivative_bounds_for(net, layer_bounds(net, x0, eps, method="ibp"))
        chain = get_jacobian_method("recurjac-f0").build_chain(net, db)
        assert rj.uses_sharing(chain, 3) is expected


def test_shared_factors_memo_is_per_chain_bounded_and_not_pickled(rng, monkeypatch):
    """The chain-only factors of the shared variant are computed once per chain object and reused by every block;
    a warm memo, a cold chain, an evicting (tiny) memo and a memo-less pickled copy all give the same bits."""
    import pickle

    import recurjac_scale.jacobian.recurjac as rj

    # every step t >= 2 takes the shared variant
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf)
    net = random_network([12, 20, 18, 16, 14, 4], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 12)
    db = derivative_bounds_for(net, layer_bounds(net, x0, 0.05, method="crown"))
    jm = get_jacobian_method("recurjac-f0")
    chain = jm.build_chain(net, db)
    assert any(rj.uses_sharing(chain, t) for t in range(2, chain.n_steps + 1))
    lo1, up1, _ = run_chain(jm, chain, row_block=5, col_block=3)
    cache = chain.memo()["shared_factors"]
    assert len(cache) >= 1 and all(isinstance(t, int) for t in cache)
    lo2, up2, _ = run_chain(jm, chain, row_block=12, col_block=7)  # warm memo, other blocking
    assert np.array_equal(lo1, lo2) and np.array_equal(up1, up2)
    copy = pickle.loads(pickle.dumps(chain))
    assert "_memo" not in copy.__dict__
    # nothing fits: recomputed by every block
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARED_CACHE_BYTES", 1)
    lo3, up3, _ = run_chain(jm, copy, row_block=4, col_block=5)
    assert np.array_equal(lo1, lo3) and np.array_equal(up1, up3)
    assert len(copy.memo().get("shared_factors", {})) == 0
    # A memo holding factors of another chain would be a silent bug: each chain object owns its memo.
    other = jm.build_chain(net, derivative_bounds_for(net, layer_bounds(net, x0, 0.01, method="crown")))
    assert other.memo() is not chain.memo()


@pytest.mark.parametrize("variant", ["shared", "dense"])
@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0", "recurjac-f1"])
@pytest.mark.parametrize(
    "fraction, gather_bytes",
    [(0.125, None), (0.0, 1), (0.6, 1), (1.0, None)],
    ids=["default", "every-row-compacted-one-per-call", "mixed-one-per-call", "never-compacted"],
)
def test_recursion_skips_structural_zeros_row_by_row(variant, method, fraction, gather_bytes, rng, monkeypatch):
    """Both variants multiply each row on its own non-zero operand rows (Term I neurons leave exact zeros): the
    shared one on its per-row factors (``_shared_matmul``), the dense per-row recursion on the compacted level
    (``_level_matmul``).  In every regime (no row compacted, every row with a Term I neuron compacted, mixed
    rows, one gathered row per GEMM call) the result equals the plain recursion up to the rounding allowance, agrees
    with the uncompacted products, contains the exact Jacobian, and is bitwise independent of the blocking and of
    the row chunks a block is processed in (``SHARED_TILE_BYTES``)."""
    import recurjac_scale.jacobian.recurjac as rj
    import recurjac_scale.jacobian.recurjac_levels as recurjac_levels
    from recurjac_scale.layer_bounds import Region
    from recurjac_scale.testing import sample_region

    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf if variant == "shared" else 0.0)
    calls = {"gather": 0, "matmul": 0}
    gather = recurjac_levels._gather_rows

    def counting_gather(Xp, rows, S, *a):  # a compacted product packs its operand's rows S
        calls["gather"] += S is not None
        return gather(Xp, rows, S, *a)

    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_levels._gather_rows", counting_gather)
    # a small radius: rows differ in their Term I neurons (mixed, partly compacted rows) and recursions go deep
    eps = 0.01
    net, x0, lb, db = _setup("relu", [10, 16, 14, 12, 12, 4], eps, math.inf, np.random.default_rng(1))
    jm = get_jacobian_method(method)
    chain = jm.build_chain(net, db)
    assert any(rj.uses_sharing(chain, t) for t in range(2, chain.n_steps + 1)) == (variant == "shared")
    # reference: every row multiplied with all factors
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_levels.SPARSE_FRACTION", 1.0)
    ref_lo, ref_up, _ = run_chain(jm, chain)
    assert calls["gather"] == 0
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_levels.SPARSE_FRACTION", fraction)
    if gather_bytes is not None:
        monkeypatch.setattr("recurjac_scale.jacobian.recurjac_levels.GATHER_BYTES", gather_bytes)
    lower, upper, states = run_chain(jm, chain)
    if fraction < 1.0:
        assert calls["gather"] > 0, "the test network must exercise the compacted products"
    else:
        assert calls["gather"] == 0
    nl, nu = naive_chain_bounds(chain)
    scale = 1.0 + _magnitude_max(chain)
    np.testing.assert_allclose(states[-1]["lower"], nl, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(states[-1]["upper"], nu, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(lower, ref_lo, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(upper, ref_up, rtol=0, atol=1e-12 * scale)
    for rb, cb in ((1, 1), (3, 2), (7, 5)):
        l2, u2, _ = run_chain(jm, chain, row_block=rb, col_block=cb)
        assert np.array_equal(lower, l2) and np.array_equal(upper, u2), (rb, cb)
    for tile in (1, 16 * 8 * 2 * 3):  # chunks of 1 row, and of a few rows, inside each block
        monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARED_TILE_BYTES", tile)
        l2, u2, _ = run_chain(jm, chain, row_block=7, col_block=3)
        assert np.array_equal(lower, l2) and np.array_equal(upper, u2), tile
    res = jacobian_bounds(net, x0, eps, method=method, layer_bounds=lb)
    J = net.jacobian(sample_region(Region.of(net, x0, eps), 2000, rng))
    assert ((J >= res.lower) & (J <= res.upper)).all()


@pytest.mark.parametrize("method", METHODS)
def test_panel_products_skip_dead_and_stable_neurons(method, rng, monkeypatch):
    """The panel products (step 1 of RecurJac, the magnitude chain, Fast-Lip) multiply only the neurons whose
    terms can be non-zero: the live ones (``du > 0``), and for the radius of RecurJac's step 1 the unstable ones
    (``dl < du``).  Every such product has exactly that inner length; the results equal the products over all
    neurons up to the rounding allowance, contain the exact Jacobian, and stay bitwise blocking-invariant."""
    import recurjac_scale.jacobian.products as ch
    import recurjac_scale.jacobian.fastlip as fl
    import recurjac_scale.jacobian.recurjac as rj
    from recurjac_scale.layer_bounds import Region
    from recurjac_scale.testing import sample_region

    eps = 0.01
    net, x0, lb, db = _setup("relu", [10, 16, 14, 12, 12, 4], eps, math.inf, np.random.default_rng(11))
    jm = get_jacobian_method(method)
    chain = jm.build_chain(net, db)
    forward = method in ("recurjac-f0", "recurjac-f1")
    T = chain.n_steps
    live = [ch.live_neurons(chain, t).size for t in range(1, T + 1)]
    unst = [ch.unstable_neurons(chain, t).size for t in range(1, T + 1)]
    widths = [d.size for d in chain.du]
    assert all(n < d for n, d in zip(live, widths)), "every level of the test chain must have dead neurons"
    if forward:
        assert 0 < unst[0] < live[0], "level 1 must have unstable and stable live neurons"
    if chain.finish_mat is not None:  # F1's finish: W(1)ᵀ on the live neurons of layer 1
        n_1 = chain.finish_du.size
        live.append(int((chain.finish_du > 0).sum()))
        widths.append(n_1)
        assert live[-1] < n_1
    inner = []
    tile = ch.tile_matmul

    def recording(A, B, *a, **k):  # panel_products' dense products go through products.tile_matmul
        inner.append(B.shape[0])
        return tile(A, B, *a, **k)

    monkeypatch.setattr(ch, "tile_matmul", recording)
    lower, upper, states = run_chain(jm, chain)
    assert inner, "the panel products must have run"
    allowed = set(live) | ({unst[0]} if jm.step is rj.recurjac_step else set())  # (linear-jacobian: RecurJac-B)
    assert set(inner) <= allowed, (sorted(set(inner)), live, unst)
    assert not set(inner) & (set(widths) - allowed), "a product ran over every neuron of a level with dead ones"
    if forward:
        assert unst[0] in inner, "step 1's radius product runs over the unstable neurons"
    # reference: every neuron multiplied (the dead and stable terms as explicit zeros)
    everyone = lambda chain, t: np.arange(chain.du[t - 1].size)  # noqa: E731
    for mod in (rj, fl):
        monkeypatch.setattr(mod, "live_neurons", everyone)
    monkeypatch.setattr(rj, "unstable_neurons", everyone)
    ref_lo, ref_up, ref_states = run_chain(jm, chain)
    scale = 1.0 + _magnitude_max(chain)
    np.testing.assert_allclose(lower, ref_lo, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(upper, ref_up, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(states[-1]["allowance"], ref_states[-1]["allowance"], rtol=1e-12, atol=0)
    monkeypatch.undo()
    for rb, cb in ((1, 1), (3, 2), (7, 5)):
        l2, u2, _ = run_chain(jm, chain, row_block=rb, col_block=cb)
        assert np.array_equal(lower, l2) and np.array_equal(upper, u2), (rb, cb)
    res = jacobian_bounds(net, x0, eps, method=method, layer_bounds=lb)
    J = net.jacobian(sample_region(Region.of(net, x0, eps), 2000, rng))
    assert ((J >= res.lower) & (J <= res.upper)).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scaled_column_gather_equals_numpy_bitwise(dtype):
    """The fused gather of the panel products' left operands gives numpy's ``A[:, cols] * s`` (and
    ``|A[:, cols]| * s``) bit for bit, for empty selections and non-contiguous inputs too."""
    from recurjac_scale.jacobian.recurjac import _scaled_cols

    rng = np.random.default_rng(5)
    A = rng.standard_normal((7, 40)).astype(dtype)
    A[0, 3] = np.inf
    A[1, 5] = -0.0
    for cols in (np.array([3, 5, 9, 39]), np.arange(40), np.zeros(0, dtype=np.int64), np.array([5, 3, 3])):
        scale = rng.uniform(0, 2, cols.size).astype(dtype)
        for M in (A, np.asfortranarray(A), A[:, ::-1]):
            got, got_abs = _scaled_cols(M, cols, scale), _scaled_cols(M, cols, scale, True)
            assert got.dtype == dtype and got.shape == (7, cols.size)
            assert np.array_equal(got, M[:, cols] * scale[None, :], equal_nan=True)
            assert np.array_equal(got_abs, np.abs(M[:, cols]) * scale[None, :], equal_nan=True)
            assert np.array_equal(np.signbit(got), np.signbit(M[:, cols] * scale[None, :]))


def test_panel_products_keep_an_overflowed_dead_neuron_out_of_the_sum():
    """A left factor that overflowed (inf) on a neuron outside ``keep`` is not multiplied (``inf * 0`` = NaN in
    the product over every neuron); with a pruned level too."""
    import recurjac_scale.jacobian.products as ch

    rng = np.random.default_rng(3)
    net, x0, lb, db = _setup("relu", [6, 9, 8, 3], 0.05, math.inf, rng)
    chain = get_jacobian_method("recurjac-f0").build_chain(net, db)
    V = rng.standard_normal((9, 5))
    keep = np.array([0, 2, 3, 7])
    A = rng.standard_normal((4, 9))
    A[:, 1] = np.inf
    pruned = chain.with_sparse(math.inf)
    assert ch.level_is_sparse(pruned, 1) and not ch.level_is_sparse(chain, 1)
    for c in (chain, pruned):
        got, got_abs = ch.panel_products(c, 1, V, (A[:, keep], False, keep), (A[:, keep], True, keep))
        assert np.isfinite(got).all() and np.isfinite(got_abs).all()
        np.testing.assert_allclose(got, A[:, keep] @ V[keep], rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(got_abs, A[:, keep] @ np.abs(V[keep]), rtol=1e-14, atol=1e-14)
        empty = np.zeros(0, dtype=np.int64)
        (z,) = ch.panel_products(c, 1, V, (A[:, empty], False, empty))
        assert z.shape == (4, 5) and not z.any()


@pytest.mark.parametrize("method", ["recurjac-f0", "recurjac-f1"])
def test_row_tile_is_a_chain_constant_and_results_stay_blocking_invariant(method, rng):
    """A chain with many rows multiplies its row blocks on larger row tiles (``Chain.row_tile``, from the chain's
    row count alone): blocks smaller than a tile, of several tiles, and one row give the same bits."""
    from recurjac_scale.jacobian.chain import ROW_TILE, ROW_TILE_MAX, row_tile_for

    assert [row_tile_for(n) for n in (1, 16, 17, 40, 64, 65, 3072)] == [ROW_TILE, 16, 32, 64, 64, 128, ROW_TILE_MAX]
    net, x0, lb, db = _setup("relu", [40, 36, 20, 18, 3], 0.01, math.inf, rng)
    jm = get_jacobian_method(method)
    chain = jm.build_chain(net, db)
    assert chain.row_tile == row_tile_for(chain.top.shape[0]) > ROW_TILE
    lower, upper, _ = run_chain(jm, chain)
    for rb, cb in ((1, 3), (7, 5), (chain.top.shape[0], 2)):
        l2, u2, _ = run_chain(jm, chain, row_block=rb, col_block=cb)
        assert np.array_equal(lower, l2) and np.array_equal(upper, u2), (rb, cb)
    res = jacobian_bounds(net, x0, 0.01, method=method, layer_bounds=lb)
    from recurjac_scale.layer_bounds import Region
    from recurjac_scale.testing import sample_region

    J = net.jacobian(sample_region(Region.of(net, x0, 0.01), 1000, rng))
    assert ((J >= res.lower) & (J <= res.upper)).all()


@pytest.mark.parametrize("method", ["recurjac-f0", "recurjac-b"])
def test_shared_workspaces_are_per_thread_and_results_unchanged(method, monkeypatch):
    """The shared variant reuses its per-row factor and product buffers from task to task (one pool per thread in
    the chain's memo): two threads running blocks of the same chain at once, on buffers left dirty by earlier
    blocks, give the bits of a fresh chain; each pool stays within the per-task work memory the plan counts."""
    import threading

    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf)
    # several row chunks per block
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARED_TILE_BYTES", 16 * 8 * 2 * 40)
    net, x0, lb, db = _setup("relu", [10, 16, 14, 12, 12, 4], 0.01, math.inf, np.random.default_rng(1))
    jm = get_jacobian_method(method)
    fresh = jm.build_chain(net, db)
    ref_lo, ref_up, _ = run_chain(jm, fresh)
    chain = jm.build_chain(net, db)
    run_chain(jm, chain, row_block=2, col_block=3)  # leaves dirty buffers of other shapes in this thread's pool
    out, errors = {}, []

    def work(name, rb, cb):
        try:
            out[name] = run_chain(jm, chain, row_block=rb, col_block=cb)[:2]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, rb, cb)) for i, (rb, cb) in enumerate([(3, 5), (7, 2)])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for lo, up in out.values():
        assert np.array_equal(lo, ref_lo) and np.array_equal(up, ref_up)
    pools = chain.memo()["workspace"]
    assert len(pools) == 3 and all("shared.Z" in p for p in pools.values())
    shape = jm.cost(chain)
    R = chain.n_rows
    bound = max(shape.work_bytes(t, R, chain.widths[t]) for t in range(2, chain.n_steps + 1))
    assert max(sum(b.nbytes for b in p.values()) for p in pools.values()) <= bound


def test_workspaces_of_ended_threads_are_dropped(monkeypatch):
    """A chain kept across runs whose thread pools are recreated holds buffers for the live threads only: a new
    thread's first block drops the pools of threads that have ended (here: a pool under an ident no live thread
    has, as the operating system may reuse the idents of ended threads)."""
    import threading

    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf)
    net, x0, lb, db = _setup("relu", [10, 16, 14, 12, 12, 4], 0.01, math.inf, np.random.default_rng(1))
    jm = get_jacobian_method("recurjac-f0")
    chain = jm.build_chain(net, db)
    ref = run_chain(jm, chain)[:2]
    pools = chain.memo()["workspace"]
    dead = max(t.ident for t in threading.enumerate()) + 12345
    pools[dead] = {"shared.Z": np.empty(1 << 20, dtype=np.uint8)}
    seen = []

    def work():
        seen.append(threading.get_ident())
        seen.append(run_chain(jm, chain, row_block=3, col_block=4)[:2])

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert np.array_equal(seen[1][0], ref[0]) and np.array_equal(seen[1][1], ref[1])
    assert dead not in pools
    assert set(pools) == {threading.get_ident(), seen[0]}
