"""Adversarial numerics (red-team review): overflow, NaN, underflow, float32 and the Lipschitz norms.

Findings pinned here:

- Overflow (weights ~1e200): interval arithmetic produced ``inf - inf = NaN`` bounds for a hidden layer, and
  Fast-Lin / CROWN then raised NonFiniteError (fixed in ``layer_bounds/ibp.py``: NaN ends become -inf / +inf).
- Overflow in the Lipschitz norms: the certified largest singular value returned NaN when ``M^T M`` overflowed
  (a NaN *reported* Lipschitz constant for p = 2), and Algorithm 2 returned NaN row norms (``inf * 0`` in the
  allowance for ``W(1) s_j``) (both fixed in ``lipschitz.py``).
- Underflow: the relative allowance ``gamma(N) * mag`` does not cover products that underflow and are then
  amplified by later factors of the chain (weights like 3e-170 * 3e-170 * 1e300: the bound was [-4e-54, 4e-54]
  around a true 9e-40), nor, in the layer bounds' back-substitution, a coefficient flushed to zero that
  multiplies activations of 1e300 (Fast-Lin certified an upper bound of 1.2e-54 for a true 4.5e-40).  Fixed by
  absolute underflow allowances (``jacobian.rounding.underflow_allowance``, ``layer_bounds.backsub._underflow_err``);
  the reproducers below are now ordinary tests, and another checks that the allowance is negligible at ordinary
  scales.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from recurjac_scale.activations import get_activation
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.layer_bounds import Region, layer_bounds
from recurjac_scale.lipschitz import induced_norm, lipschitz
from recurjac_scale.network import Network
from recurjac_scale.testing import random_network, sample_region

METHODS = sorted(JACOBIAN_METHODS)


def _huge_net(scale, act, rng, depth=3, width=4, n0=3, m=2):
    widths = [n0] + [width] * (depth - 1) + [m]
    ws = [rng.normal(size=(b, a)) * scale for a, b in zip(widths[:-1], widths[1:])]
    bs = [rng.normal(size=b) for b in widths[1:]]
    a = get_activation(act)
    return Network(ws, bs, [a] * (depth - 1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "softplus", "elu", "hard_sigmoid"])
@pytest.mark.parametrize("scale", [1e100, 1e160, 1e200, 1e300])
def test_overflow_never_nan_never_crash(act, scale, rng):
    """Absurd weights: every bound is either sound or infinite, never NaN, never a crash; float32, whose range
    they exceed, is refused with a clear error."""
    from recurjac_scale.errors import InputError

    net = _huge_net(scale, act, rng)
    x0 = rng.normal(size=3)
    f32_ok = max(float(np.abs(w).max()) for w in net.weights) <= np.finfo(np.float32).max
    lbs = ["ibp", "crown"] + (["fastlin"] if act in ("relu", "leaky_relu") else [])
    for eps in (0.0, 0.1, math.inf):
        for lbm in lbs:
            lb = layer_bounds(net, x0, eps, method=lbm)
            for lo, hi in zip(lb.lower, lb.upper):
                assert not (np.isnan(lo).any() or np.isnan(hi).any()), lbm
            for meth in METHODS:
                for dt in (np.float64, np.float32):
                    if dt is np.float32 and not f32_ok:
                        with pytest.raises(InputError, match="exceeds the float32 range"):
                            jacobian_bounds(net, x0, eps, method=meth, layer_bounds=lbm, dtype=dt)
                        continue
                    r = jacobian_bounds(net, x0, eps, method=meth, layer_bounds=lbm, dtype=dt)
                    assert not (np.isnan(r.lower).any() or np.isnan(r.upper).any()), (lbm, meth, dt)
                    J = net.jacobian(x0)
                    fin = np.isfinite(J)
                    assert (r.lower[fin] <= J[fin]).all() and (J[fin] <= r.upper[fin]).all(), (lbm, meth, dt)


def test_overflow_crash_minimal_reproducer():
    """Minimal reproducer of the Fast-Lin / CROWN crash: inf - inf in the interval bound of hidden layer 2."""
    W1 = np.array([[1e200], [1e200]])
    W2 = np.array([[1e200, -1e200], [1e200, -1e200]])
    net = Network([W1, W2, np.array([[1.0, 1.0]])], [np.zeros(2)] * 2 + [np.zeros(1)], ["relu", "relu"])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for m in ("ibp", "fastlin", "crown"):
            lb = layer_bounds(net, np.array([1.0]), 0.1, method=m)
            assert lb.lower[1][0] == -math.inf and lb.upper[1][0] == math.inf
            assert not any(np.isnan(v).any() for v in lb.lower + lb.upper)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [math.inf, 2, 1])
@pytest.mark.parametrize("outputs", [None, 0, (0, 1)])
def test_lipschitz_never_nan(method, p, outputs, rng):
    for scale in (1e80, 1e160, 1e200):
        net = _huge_net(scale, "relu", rng, n0=4, width=5, m=3)
        r = lipschitz(net, rng.normal(size=4), [0.0, 0.1], p, method=method, outputs=outputs)
        for pt in r.points:
            vals = [pt.lipschitz, pt.prop2, *pt.row_norms] + ([pt.algorithm2] if pt.algorithm2 is not None else [])
            assert not any(math.isnan(v) for v in vals), (scale, pt)


def test_sigma_max_overflow_minimal_reproducer(rng):
    """``induced_norm(M, 2)`` of a non-negative M whose Gram matrix overflows: was NaN, must be >= sigma_max."""
    M = np.abs(rng.normal(size=(3, 4))) * 1e160
    with np.errstate(all="ignore"):
        v = induced_norm(M, 2.0)
        s = np.linalg.svd(M / 1e160, compute_uv=False)[0] * 1e160
    assert not math.isnan(v) and v >= s


# -- underflow -------------------------------------------------------------------------------------------------------


def test_underflow_float64_minimal_reproducer():
    """J = 1e300 * 3e-170 * 3e-170 = 9e-40 exactly representable in float64, but the backward step computes the
    product of the two small weights first (9e-340, below the subnormal range): the bound is [-4e-54, 4e-54]."""
    net = Network([np.array([[3e-170]]), np.array([[3e-170]]), np.array([[1e300]])],
                  [np.ones(1), np.ones(1), np.zeros(1)], ["relu", "relu"])
    J = net.jacobian(np.zeros((1, 1)))[0]
    assert J[0, 0] > 8e-40
    r = jacobian_bounds(net, np.zeros(1), 0.0, method="recurjac-b")
    assert r.lower[0, 0] <= J[0, 0] <= r.upper[0, 0]
    for method in METHODS:  # every method, every direction of the chain
        r = jacobian_bounds(net, np.zeros(1), 0.0, method=method)
        assert r.lower[0, 0] <= J[0, 0] <= r.upper[0, 0], method


def test_underflow_float32_minimal_reproducer():
    """The float32 option with weights 3e-22, 3e-22, 1e30: the partial product 9e-44 is subnormal in float32
    (3 significant bits), then multiplied by 1e30."""
    net = Network([np.array([[3e-22]]), np.array([[3e-22]]), np.array([[1e30]])],
                  [np.ones(1), np.ones(1), np.zeros(1)], ["relu", "relu"])
    J = net.jacobian(np.zeros((1, 1)))[0]
    r = jacobian_bounds(net, np.zeros(1), 0.0, method="recurjac-b", dtype=np.float32)
    assert r.lower[0, 0] <= J[0, 0] <= r.upper[0, 0]


@pytest.mark.parametrize("method", ["fastlin", "crown"])
def test_underflow_in_back_substitution_is_covered(method):
    """Lam' = 3e-170 * 3e-170 flushes to zero in the back-substitution, but multiplies h(1) ~ 5e299: the true
    z(3) is 4.5e-40.  Checked on the back-substitution alone (without the IBP intersection, which would hide
    it), at sampled points of the region."""
    from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS
    from recurjac_scale.layer_bounds.backsub import backsubstitute
    from recurjac_scale.layer_bounds.crown import crown_relaxation
    from recurjac_scale.layer_bounds.fastlin import fastlin_relaxation

    assert method in LAYER_BOUND_METHODS
    net = Network([np.array([[1e300]]), np.array([[3e-170]]), np.array([[3e-170]]), np.array([[1.0]])],
                  [np.zeros(1), np.full(1, 1e100), np.zeros(1), np.zeros(1)], ["relu", "relu", "relu"])
    x0 = np.array([0.5])
    region = Region.of(net, x0, 0.1)
    relax = fastlin_relaxation if method == "fastlin" else crown_relaxation
    lowers, uppers = backsubstitute(net, region, relax, intersect_ibp=False)
    zs = net.pre_activations(np.linspace(0.4, 0.6, 21)[:, None])
    for k, z in enumerate(zs):
        assert ((z >= lowers[k]) & (z <= uppers[k])).all(), (k, lowers[k], uppers[k], z.min(), z.max())
    # and through the public API (IBP intersection on): a valid, non-empty interval
    lb = layer_bounds(net, x0, 0.1, method=method)
    assert lb.lower[2][0] <= zs[2].min() and zs[2].max() <= lb.upper[2][0]


def test_underflow_allowances_are_negligible_at_ordinary_scales(rng):
    """The allowance must not cost tightness on networks of ordinary scale (it is ~1e-280 there)."""
    from recurjac_scale.jacobian import derivative_bounds_for, get_jacobian_method
    from recurjac_scale.jacobian.rounding import underflow_allowance

    net = random_network([64, 256, 256, 128, 10], "relu", rng)
    x0 = rng.uniform(0, 1, 64)
    lb = layer_bounds(net, x0, 0.01, method="crown")
    for name in ("recurjac-b", "recurjac-f0"):
        chain = get_jacobian_method(name).build_chain(net, derivative_bounds_for(net, lb))
        for t in range(1, chain.n_steps + 1):
            assert 0 < underflow_allowance(chain, t) < 1e-250


# -- float32 layer bounds and Jacobian bounds on mixed scales -----------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_float32_layer_bounds_mixed_scales(act, rng):
    net = random_network([8, 12, 10, 9, 4], act, rng)
    ws = [w * 10.0 ** rng.uniform(-3, 3, size=(w.shape[0], 1)) for w in net.weights]
    net = Network(ws, list(net.biases), list(net.activations))
    x0 = rng.normal(size=8)
    for eps in (1e-3, 0.1):
        region = Region.of(net, x0, eps)
        X = sample_region(region, 2000, rng)
        zs = net.pre_activations(X)
        for m in ("fastlin", "crown") if act == "relu" else ("crown",):
            lb = layer_bounds(net, x0, eps, method=m, dtype=np.float32)
            for k, z in enumerate(zs):
                assert ((z >= lb.lower[k]) & (z <= lb.upper[k])).all(), (m, k)
        J = net.jacobian(X)
        for meth in METHODS:
            r = jacobian_bounds(net, x0, eps, method=meth, dtype=np.float32)
            assert ((J >= r.lower) & (J <= r.upper)).all(), meth


# -- Algorithm 2: many rows with different sign patterns ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0", "recurjac-f1"])
def test_algorithm2_per_row_dominates_sampled_rows(method, rng):
    """Each row norm (Algorithm 2, own sign vector per row) must dominate that row's sampled ||J[j, :]||_1."""
    net = random_network([7, 12, 10, 6], "relu", rng, bias_scale=0.5)
    C = rng.normal(size=(5, 6))
    C[0] = -C[1]  # opposite rows: opposite sign patterns
    x0 = rng.normal(size=7)
    for eps in (1e-3, 0.02, 0.2):
        res = lipschitz(net, x0, eps, math.inf, method=method, outputs=C)
        pt = res.points[0]
        X = sample_region(Region.of(net, x0, eps), 3000, rng)
        J = np.einsum("mh,khn->kmn", C, net.jacobian(X))
        row_max = np.abs(J).sum(axis=2).max(axis=0)
        assert (row_max <= np.asarray(pt.row_norms)).all(), (eps, row_max, pt.row_norms)
        assert row_max.max() <= pt.lipschitz


@pytest.mark.parametrize("p", [math.inf, 2, 1])
def test_lipschitz_eps_zero_is_gradient_norm(p, rng):
    net = random_network([6, 9, 8, 1], "tanh", rng)
    x0 = rng.normal(size=6)
    g = net.jacobian(x0)[0]
    q = {math.inf: 1, 2: 2, 1: math.inf}[p]
    true = np.linalg.norm(g, ord=q)
    for meth in METHODS:
        L = lipschitz(net, x0, 0.0, p, method=meth).points[0].lipschitz
        assert true <= L <= true * (1 + 1e-9) + 1e-300, (meth, true, L)


# -- rounding allowance against an extended-precision reference ----------------------------------------------------


def _jacobian_longdouble(net: Network, X: np.ndarray, alpha: float) -> np.ndarray:
    """Jacobian of a (leaky) ReLU network in extended precision (right derivatives), shape (k, n_H, n_0); points
    whose pre-activations are too close to a kink for the extended reference to be sure are dropped."""
    ld = np.longdouble
    out = []
    for x in X:
        h = x.astype(ld)
        J = np.eye(x.shape[0], dtype=ld)
        ok = True
        for k, (w, b) in enumerate(zip(net.weights, net.biases)):
            W = np.asarray(w).astype(ld)
            z = W @ h + np.asarray(b).astype(ld)
            J = W @ J
            if k < net.n_layers - 1:
                if (np.abs(z) < 1e-12 * (np.abs(W) @ np.abs(h) + 1)).any():
                    ok = False
                d = np.where(z >= 0, ld(1), ld(alpha))
                J = d[:, None] * J
                h = np.where(z >= 0, z, ld(alpha) * z)
        if ok:
            out.append(J)
    return np.array(out)


@pytest.mark.skipif(np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps, reason="no extended precision")
@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rounding_allowance_against_extended_precision(alpha, dtype, rng):
    """At eps = 0 (and tiny eps) the bounds are as tight as the rounding allowance: an extended-precision
    Jacobian must still lie inside them, with no tolerance at all (deep and wide, mixed scales, cancellation)."""
    import recurjac_scale.jacobian.recurjac_shared as rjs

    act = "relu" if alpha == 0.0 else "leaky_relu"
    kw = {} if alpha == 0.0 else {"alpha": alpha}
    for widths in ([12, 40, 40, 40, 40, 6], [5, 64, 3, 64, 2]):
        net = random_network(widths, act, rng, **kw)
        ws = [w * 10.0 ** rng.uniform(-2, 2, size=(w.shape[0], 1)) for w in net.weights]
        ws[1][1] = -ws[1][0] * (1 + 1e-9)  # near-cancelling rows
        net = Network(ws, list(net.biases), list(net.activations))
        x0 = rng.normal(size=widths[0])
        for eps in (0.0, 1e-9, 1e-4):
            region = Region.of(net, x0, eps)
            X = sample_region(region, 40, rng)
            Jld = _jacobian_longdouble(net, X, alpha)
            assert len(Jld) > 0
            for share in (0.0, math.inf):
                rj_share, rj_unst = rjs.SHARE_RATIO, rjs.UNSTABLE_FRACTION
                rjs.SHARE_RATIO, rjs.UNSTABLE_FRACTION = share, (math.inf if share else 0.0)
                try:
                    for meth in METHODS:
                        r = jacobian_bounds(net, x0, eps, method=meth, layer_bounds="crown", dtype=dtype)
                        lo = r.lower.astype(np.longdouble)
                        hi = r.upper.astype(np.longdouble)
                        bad = (Jld < lo) | (Jld > hi)
                        assert not bad.any(), (widths, eps, share, meth, np.argwhere(bad)[:3])
                finally:
                    rjs.SHARE_RATIO, rjs.UNSTABLE_FRACTION = rj_share, rj_unst


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_naive_constant_zero_times_overflow_minimal_reproducer():
    """A layer whose norm overflows (inf) and an all-zero layer: the naive product was inf * 0 = NaN."""
    from recurjac_scale.lipschitz import naive_constant

    net = Network([np.full((2, 2), 1e308), np.zeros((2, 2)), np.ones((1, 2))], [np.zeros(2)] * 2 + [np.zeros(1)],
                  ["relu", "relu"])
    for p in (math.inf, 2, 1):
        v = naive_constant(net, p)
        assert not math.isnan(v)
    r = lipschitz(net, np.zeros(2), 0.1)
    assert not math.isnan(r.naive_global) and not math.isnan(r.points[0].lipschitz)


# -- output matrices with cancellation (fold of C into the last layer) ---------------------------------------------


def test_output_matrix_cancellation_minimal_reproducer():
    """``C = [1, 1, -1]`` on outputs ``(x, 1e-17 x, x)``: C J = 1e-17 exactly, but the plain fold ``C @ W(H)``
    rounds to 0 and every method certified ``|C J| <= 2e-307`` (and a Lipschitz constant of 0)."""
    net = Network([np.array([[1.0]]), np.array([[1.0], [1e-17], [1.0]])], [np.ones(1), np.zeros(3)], ["relu"])
    C = np.array([[1.0, 1.0, -1.0]])
    true = 1e-17  # (1 + w - 1) in real arithmetic, w the float 1e-17, for every x in the region (ReLU active)
    for meth in METHODS:
        r = jacobian_bounds(net, np.zeros(1), 0.1, method=meth, outputs=C)
        assert r.lower[0, 0] <= true <= r.upper[0, 0], meth
    assert lipschitz(net, np.zeros(1), 0.1, outputs=C).points[0].lipschitz >= true


@pytest.mark.parametrize("method", METHODS)
def test_output_matrix_cancellation_exact_rational(method, rng):
    """Random general output matrices with heavy cancellation, checked against exact rational arithmetic:
    the network is ``x -> W2 relu(x + 1)`` near 0, so ``C J = C W2`` exactly."""
    from fractions import Fraction

    for _ in range(20):
        nH = int(rng.integers(3, 7))
        W2 = rng.normal(size=(nH, 1)) * 10.0 ** rng.integers(-20, 1, size=(nH, 1))
        C = rng.normal(size=(3, nH))
        # make row 0 cancel: C[0] . W2 ~ 0
        C[0, -1] = -(C[0, :-1] @ W2[:-1, 0]) / W2[-1, 0]
        net = Network([np.array([[1.0]]), W2], [np.ones(1), np.zeros(nH)], ["relu"])
        r = jacobian_bounds(net, np.zeros(1), 0.25, method=method, outputs=C)
        for i in range(3):
            exact = sum(Fraction(float(C[i, h])) * Fraction(float(W2[h, 0])) for h in range(nH))
            assert Fraction(float(r.lower[i, 0])) <= exact <= Fraction(float(r.upper[i, 0])), (i, float(exact))


def test_output_fold_is_correctly_rounded_entry_by_entry(rng):
    """The fold ``C @ W(H)`` of a general output matrix equals the exact rational product rounded to nearest, for
    every entry: wide mixed magnitudes, engineered cancellation, exact zeros, many columns (the compiled exact dot
    products of ``_fold_rows``); selection and margin rows keep the one-product path."""
    from fractions import Fraction

    from recurjac_scale.network.model import _fold_rows

    def nearest(q: Fraction) -> float:
        f = float(q)  # Fraction -> float rounds correctly (to nearest, ties to even)
        return f

    for trial in range(6):
        nH, n = int(rng.integers(2, 40)), int(rng.integers(1, 30))
        W = rng.normal(size=(nH, n)) * 10.0 ** rng.integers(-30, 30, size=(nH, n))
        W[rng.random((nH, n)) < 0.2] = 0.0
        C = rng.normal(size=(4, nH)) * 10.0 ** rng.integers(-5, 5, size=(4, nH))
        # row 0 cancels in column 0; row 1 is a margin (one product is exact); row 3 selects
        if W[-1, 0] != 0.0:
            C[0, -1] = -(C[0, :-1] @ W[:-1, 0]) / W[-1, 0]
        C[1] = 0.0
        C[1, 0], C[1, -1] = 1.0, -1.0
        C[3] = 0.0
        C[3, nH // 2] = 1.0
        out = _fold_rows(C, W)
        for i in range(4):
            for k in range(n):
                exact = sum(Fraction(float(C[i, h])) * Fraction(float(W[h, k])) for h in range(nH))
                assert out[i, k] == nearest(exact), (trial, i, k)
    # ties to even across several partials: 1 + 2^-53 + 2^-106 rounds up, 1 + 2^-53 alone rounds to even (down)
    C = np.array([[1.0, 1.0, 1.0]])
    W = np.array([[1.0, 1.0], [2.0**-53, 2.0**-53], [2.0**-106, 0.0]])
    out = _fold_rows(C, W)
    assert out[0, 0] == 1.0 + 2.0**-52 and out[0, 1] == 1.0
