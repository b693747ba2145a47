"""Certified robustness radii (recurjac_scale.applications.certify) against a real PGD attack and sampling, on the
real auto_LiRPA MNIST MLP with ERAN's images and on small digits models; the integral bound by hand; the default
search against the authors' search; box regions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.applications import SEARCHES, attack_radius, certify, integral_radius, pgd_attack
from recurjac_scale.applications import search as search_module
from recurjac_scale.applications.certify import _margin_rows, resolve_targets
from recurjac_scale.applications.search import LAYER_BOUNDS_CACHE, LocalConstants, _grid_search, _hidden_network
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.network.model import Network
from recurjac_scale.applications.inputs import box_network
from recurjac_scale.network.default import default_inputs, default_model_path
from recurjac_scale.network.store import open_network
from test_real_networks import load_mnist_fc, load_mnist_images


@pytest.fixture(scope="module")
def mnist(shared_dir):
    net = load_mnist_fc(shared_dir)
    X, y = load_mnist_images(shared_dir, 6)
    return net, X, y


@pytest.fixture(scope="module")
def digits_net():
    return open_network(default_model_path()).materialize()


def _margin(net, x, c, j):
    out = net.forward(np.atleast_2d(x))
    if j is None:
        other = out.copy()
        other[:, c] = -np.inf
        return out[:, c] - other.max(axis=1)
    return out[:, c] - out[:, j]


def _samples(x0, R, p, lo, hi, rng, n=400):
    """Points of B_p[x0, R] ∩ [lo, hi]: random, and (l-inf) the sign vertices of the ball."""
    d = x0.shape[0]
    if p == math.inf:
        pts = x0 + R * rng.choice([-1.0, 1.0], size=(n, d))
        pts = np.concatenate([pts, x0 + rng.uniform(-R, R, size=(n, d))])
    else:
        g = rng.normal(size=(2 * n, d))
        g *= (R / np.linalg.norm(g, axis=1))[:, None]
        pts = x0 + g
    return np.clip(pts, lo, hi)


# -- the integral bound by hand ---------------------------------------------------------------------------


def test_integral_radius_by_hand():
    # E = 1 on (0, 1], 3 on (1, 2]: integral 1 + 3 (R - 1) = 2.5 at R = 1.5
    assert integral_radius([1.0, 2.0], [1.0, 3.0], 2.5) == pytest.approx(1.5, rel=1e-11)
    assert integral_radius([1.0, 2.0], [1.0, 3.0], 2.5) < 1.5
    # a smaller constant at a larger radius is a sound stand-in for the smaller radius: E = 3 on (0, 2]
    assert integral_radius([2.0, 1.0], [3.0, 5.0], 2.5) == pytest.approx(2.5 / 3.0, rel=1e-11)
    # certified up to the last radius and no further (nothing is known beyond it)
    assert integral_radius([1.0], [1.0], 10.0) == pytest.approx(1.0, rel=1e-11)
    assert integral_radius([1.0], [1.0], -1.0) == 0.0
    assert integral_radius([1.0, 2.0], [math.inf, 1.0], 0.5) == pytest.approx(0.5, rel=1e-11)


# -- soundness against the attack on the real MNIST network -----------------------------------------------


@pytest.mark.parametrize("p", ["inf", 2])
def test_mnist_certified_radius_below_attack(mnist, p):
    """Certified radius <= the distance of every adversarial example PGD finds; PGD succeeds within 5x of it."""
    net, X, y = mnist
    pn = math.inf if p == "inf" else 2.0
    eps_max = 0.3 if p == "inf" else 5.0
    close = 0
    for i in range(3):
        res = certify(net, X[i], int(y[i]), "runnerup", p)
        assert not res.misclassified and res.radius > 0
        assert res.margin_bound_radius is not None and res.margin_bound_radius > 0
        att = attack_radius(net, X[i], int(y[i]), p, target=res.target, eps_max=eps_max, search_steps=10,
                            steps=60, restarts=3, seed=i)
        assert att.success
        assert _margin(net, att.x_adv, res.label, res.target)[0] < 0  # a real adversarial example
        assert res.radius <= att.distance
        assert res.margin_bound_radius <= att.distance
        close += att.distance <= 5.0 * res.radius
    assert close >= 1  # the attack gets within 5x of the certificate on some inputs


def test_mnist_sampling_at_certified_radius(mnist, rng):
    """g > 0 at the vertices and random points of the certified l-inf ball; an attack confined to it fails."""
    net, X, y = mnist
    for i in (0, 3):
        for target in ("runnerup", "untargeted"):
            res = certify(net, X[i], int(y[i]), target, "inf", margin_bound=False)
            pts = _samples(X[i], res.radius, math.inf, 0.0, 1.0, rng)
            assert (_margin(net, pts, res.label, res.target) > 0).all()
            att = pgd_attack(net, X[i], res.label, res.radius, "inf", target=res.target, steps=100, restarts=4)
            assert not att.success


def test_untargeted_is_min_over_targets(mnist):
    net, X, y = mnist
    u = certify(net, X[1], int(y[1]), "untargeted", "inf", margin_bound=False)
    per = [certify(net, X[1], int(y[1]), j, "inf", margin_bound=False).radius for j in range(10) if j != y[1]]
    # untargeted uses the same kind of grid on every row at once; it cannot exceed the smallest target radius
    # by more than its grid resolution, and it must not exceed the true minimal distance (checked above)
    assert u.target is None
    assert u.radius <= min(per) * 1.05
    assert u.radius >= min(per) * 0.5


def _searches_vs_paper(net, X, y, images, targets=("runnerup", "random", "least"), searches=("grid", "replay")):
    for i in images:
        for t in targets:
            pp = certify(net, X[i], int(y[i]), t, "inf", margin_bound=False, index=int(i), search="paper")
            for search in searches:
                d = certify(net, X[i], int(y[i]), t, "inf", margin_bound=False, index=int(i), search=search)
                assert d.target == pp.target
                assert d.radius >= pp.radius, (search, i, t)
                assert d.evaluations * (8 if search == "grid" else 3) <= pp.evaluations, (search, i, t)


def _correct(net, X, y, k):
    return np.flatnonzero(net.forward(X).argmax(axis=1) == y)[:k]


def test_default_search_not_below_paper_search(mnist):
    """The default grid search (one grid of radii reused for every candidate) and the replay search (the grid,
    then the authors' driver replayed with cheaper probes) certify at least the radius of the authors' search
    (n = 15 intervals, 15-step binary search) on every target of the first image -- the least-likely target was
    0.1 % below with a grid of 20 radii -- the grid with an eighth of the evaluations or fewer, the replay with a
    third."""
    _searches_vs_paper(*mnist, images=(0,))


@pytest.mark.slow
def test_default_search_not_below_paper_search_all(shared_dir):
    """The same on the items of the search benchmark (benchmarks/bench_certify_search.py): the first ten
    correctly classified test images x runner-up / random / least-likely."""
    net = load_mnist_fc(shared_dir)
    X, y = load_mnist_images(shared_dir, 12)
    _searches_vs_paper(net, X, y, images=_correct(net, X, y, 10))


class _Profile(LocalConstants):
    """Local constants given by a formula of the radius (>= the gradient norm ``G`` at 0, as every computed
    constant is; deterministic in ``r``, as the engine is), to run both searches on many shapes, non-monotone
    ones included."""

    def __post_init__(self):
        pass

    def __call__(self, r):
        r = float(r)
        if r not in self.cache:
            self.evaluations += 1
            a, b, jump, at, wiggle, G = self.C
            v = G * (1.0 + a * r + b * r * r + (jump if r > at else 0.0))
            v += wiggle * G * (0.5 + 0.5 * math.sin(r * 7.3e4))  # non-monotone, >= 0
            self.cache[r] = np.array([v])
        return self.cache[r]


def test_replay_search_not_below_paper_search_on_profiles():
    """The dominance argument of the module docstring (``search="replay"``) on 300 random profiles L(r): smooth,
    with jumps, and non-monotone; the grid search (the default) falls below the paper's search on some of them,
    so it is the replay that carries the guarantee."""
    rng = np.random.default_rng(5)
    below_grid_only = 0
    for _ in range(300):
        G = float(rng.uniform(1.0, 10.0))
        coef = (float(rng.uniform(0, 200)), float(rng.uniform(0, 4000)), float(rng.choice([0.0, rng.uniform(0, 2)])),
                float(rng.uniform(0, 0.05)), float(rng.choice([0.0, rng.uniform(0, 0.3)])), G)
        g0 = np.array([G * float(rng.uniform(0.005, 0.2))])
        r_cap = float(g0[0] / G)
        mk = lambda: _Profile(None, None, coef, math.inf, "", None)  # noqa: E731
        p, d, grid_only = mk(), mk(), mk()
        rp = SEARCHES["paper"](p, g0, r_cap)
        rd = SEARCHES["replay"](d, g0, r_cap, grad_norm=np.array([G]))
        assert rd >= rp
        assert d.radius(g0) <= rd  # the stand-in radius is part of the result
        below_grid_only += _grid_search(grid_only, g0, r_cap, grad_norm=np.array([G])) < rp
    assert below_grid_only > 0


# -- reuse across radii and targets gives the same bytes ----------------------------------------------------


def _reference_constants(net, x, C, r):
    """The local constants as computed without any reuse: lipschitz() with the layer bounds of the whole
    network, per row the smaller of its row norm and the naive constant."""
    from recurjac_scale.lipschitz_norms import naive_constant

    rows = np.asarray(lipschitz(net, x, r, math.inf, method="recurjac-b", layer_bounds="crown",
                               outputs=C).points[0].row_norms)
    naive = np.array([naive_constant(net.with_outputs(C[i : i + 1]), math.inf) for i in range(C.shape[0])])
    return np.minimum(rows, naive)


def test_reuse_gives_the_same_constants(mnist):
    """The default search's reuse (hidden-layer bounds shared by the targets of an input, the Jacobian part of a
    radius with the same derivative bounds as an earlier one) returns the same bytes as a computation without any
    reuse, at radii where it does reuse: probes of the authors' search near the threshold, whose points share
    derivative bounds, on two targets and two inputs."""
    net, X, y = mnist
    radii = [R * i / 15 for R in (0.0201, 0.0203, 0.0206) for i in range(15, 0, -1)]
    LAYER_BOUNDS_CACHE.clear()
    for xi in (0, 1):
        x = X[xi]
        logits = net.forward(x)
        c = int(y[xi])
        for k, target in enumerate(("runnerup", "least")):
            C = _margin_rows(10, c, resolve_targets(target, logits, c))
            lc = LocalConstants(net, x, C, math.inf, "recurjac-b", "crown", reuse=True)
            for r in radii:
                got, want = lc(r), _reference_constants(net, x, C, r)
                assert np.array_equal(got, want), (xi, target, r, got, want)
            assert lc.evaluations == len(radii)
            assert lc.jacobian_runs < 0.8 * len(radii)  # derivative bounds repeat: the reuse was exercised
            # the second target of an input computes no layer bounds; the first of the next input computes all
            assert lc.layer_bound_runs == (0 if k else len(radii))
    LAYER_BOUNDS_CACHE.clear()


def test_reuse_certify_result_unchanged(mnist):
    """certify with and without the reuse: the same radius, evaluations, radii and constants on every target."""
    net, X, y = mnist
    LAYER_BOUNDS_CACHE.clear()
    for t in ("runnerup", "random", "least"):
        a = certify(net, X[2], int(y[2]), t, "inf", margin_bound=False, index=2, reuse=True)
        b = certify(net, X[2], int(y[2]), t, "inf", margin_bound=False, index=2, reuse=False)
        assert (a.radius, a.evaluations, a.radii, a.constants) == (b.radius, b.evaluations, b.radii, b.constants)
    LAYER_BOUNDS_CACHE.clear()


def test_layer_bounds_cache_keeps_at_most_its_budget():
    """Least recently used entries go first; an entry larger than the budget is not kept."""

    class _LB:
        def __init__(self, n):
            self.lower, self.upper = (np.zeros(n),), (np.zeros(n),)

    cache = search_module._BoundsCache(2000)  # room for two entries of 2 x 50 float64
    a, b, c = _LB(50), _LB(50), _LB(50)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "a" is now the most recently used
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    cache.put("big", _LB(200))
    assert cache.get("big") is None and len(cache) == 2


@pytest.mark.parametrize("method", ["crown", "fastlin", "ibp"])
def test_hidden_layer_bounds_equal_those_of_the_whole_network(rng, method):
    """The hidden layers' bounds computed on the network cut after its last hidden layer are the same bytes as
    those of the whole network; a cut that would change CROWN's choice of passes (here: the cut network is all
    ReLU, the whole one is not, so CROWN would add the Fast-Lin pass) is refused."""
    ws = [rng.normal(size=(12, 6)), rng.normal(size=(9, 12)), rng.normal(size=(7, 9)), rng.normal(size=(3, 7))]
    bs = [rng.normal(size=w.shape[0]) for w in ws]
    net = Network(ws, bs, ["relu", "relu", "relu"])
    hidden = _hidden_network(net, "recurjac-b")
    x = rng.normal(size=6)
    for eps in (0.05, 0.2, 0.6):
        full = layer_bounds(net, x, eps, math.inf, method=method)
        cut = layer_bounds(hidden, x, eps, math.inf, method=method)
        assert len(cut.lower) == 3
        for k in range(3):
            assert np.array_equal(full.lower[k], cut.lower[k]) and np.array_equal(full.upper[k], cut.upper[k])
    assert _hidden_network(Network(ws, bs, ["relu", "relu", "tanh"]), "recurjac-b") is None
    assert _hidden_network(Network(ws[:1], bs[:1], []), "recurjac-b") is None
    assert search_module._hidden_network(net, "linear-jacobian") is None


def test_misclassified_reported_with_radius_zero(digits_net):
    x = default_inputs()
    pred = int(np.argmax(digits_net.forward(x[0])))
    wrong = (pred + 1) % 10
    res = certify(digits_net, x[0], wrong, "runnerup", "inf")
    assert res.misclassified and res.radius == 0.0 and res.prediction == pred and res.label == wrong


def test_digits_model_l2_and_fastlip(digits_net, rng):
    """A trained digits model: Fast-Lip <= RecurJac-B radius is not required, but both must be below the attack."""
    x = default_inputs()
    for i in range(2):
        c = int(np.argmax(digits_net.forward(x[i])))
        for method in ("fastlip", "recurjac-b"):
            res = certify(digits_net, x[i], None, "least", 2, method=method, margin_bound=False)
            att = attack_radius(digits_net, x[i], c, 2, target=res.target, eps_max=8.0, search_steps=8, steps=60,
                                restarts=3)
            assert att.success and res.radius <= att.distance
            pts = _samples(x[i], res.radius, 2.0, 0.0, 1.0, rng, n=200)
            assert (_margin(digits_net, pts, c, res.target) > 0).all()


def test_random_target_seeded(digits_net):
    x = default_inputs()
    a = certify(digits_net, x[1], None, "random", "inf", seed=3, index=7, margin_bound=False)
    b = certify(digits_net, x[1], None, "random", "inf", seed=3, index=7, margin_bound=False)
    assert a.target == b.target and a.radius == b.radius
    targets = {certify(digits_net, x[1], None, "random", "inf", seed=s, index=7, margin_bound=False).target
               for s in range(6)}
    assert len(targets) > 1


def test_box_region_equals_scaled_ball(digits_net):
    """A box x0 ± e inside the domain is the l-inf ball of radius e: the certified box scale times e equals the
    ball radius."""
    x0 = default_inputs()[2]
    e = 0.01
    lo, hi = x0 - e, x0 + e
    inside = (lo >= 0) & (hi <= 1)
    x0 = np.where(inside, x0, 0.5)  # keep every coordinate's box inside [0, 1]
    net_u, u0 = box_network(digits_net, x0 - e, x0 + e)
    ru = certify(net_u, u0, None, "runnerup", "inf", margin_bound=False)
    rx = certify(digits_net, x0, None, "runnerup", "inf", margin_bound=False)
    assert ru.target == rx.target
    assert ru.radius * e == pytest.approx(rx.radius, rel=1e-6)


def test_box_region_sampling(digits_net, rng):
    """An asymmetric box clipped by the domain: every sampled point of the certified scaled box keeps the class."""
    x0 = default_inputs()[3]
    w = rng.uniform(0.0, 0.05, size=x0.shape)
    w[:10] = 0.0  # fixed coordinates
    lo, hi = np.clip(x0 - w, 0, 1), np.clip(x0 + 2 * w, 0, 1)
    net_u, u0 = box_network(digits_net, lo, hi)
    res = certify(net_u, u0, None, "runnerup", "inf", margin_bound=False)
    assert res.radius > 0
    c0, w0 = 0.5 * (lo + hi), 0.5 * (hi - lo)
    u = rng.choice([-1.0, 1.0], size=(500, x0.size)) * res.radius
    pts = np.clip(c0 + w0 * u, 0, 1)
    assert (_margin(digits_net, pts, res.label, res.target) > 0).all()
