"""A real network: auto_LiRPA's 784-128-64-10 MNIST MLP (``nets/auto_lirpa/mnist_fc_3layer.npz``) on MNIST test
images (ERAN's first 100), l-inf, eps in {0, 0.001, 0.01, 0.03}, all four Jacobian methods.

Checks: the exact Jacobian at sampled and attacked points of ``B_inf[x, eps] ∩ [0, 1]^784`` lies in the bounds; the
Lipschitz constant of the predicted logit is >= its gradient l1 norm at those points (and at points that maximise
it); at eps = 0 it is the gradient norm.  The default run uses 2 images and fewer points; ``-m slow`` all 5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.network.model import InputSpec, Network
from recurjac_scale.testing import hill_climb, jacobian_attack_points, neuron_attack_points, sample_region

EPS = (0.0, 0.001, 0.01, 0.03)
METHODS = sorted(JACOBIAN_METHODS)


def load_mnist_fc(shared_dir) -> Network:
    """The auto_LiRPA MNIST MLP as a Network on raw pixels in [0, 1] (no normalisation: mean 0, std 1)."""
    d = np.load(shared_dir / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz")
    n = int(d["n_layers"])
    acts = [str(a) for a in d["acts"]]
    assert acts[-1] == "linear" and all(a == "relu" for a in acts[:-1])
    assert float(d["mean"]) == 0.0 and float(d["std"]) == 1.0
    spec = InputSpec(shape=(784,), domain_lower=0.0, domain_upper=1.0)
    return Network(
        [d[f"W{k}"] for k in range(n)], [d[f"b{k}"] for k in range(n)], acts[:-1], input_spec=spec,
        provenance={"source": "auto_LiRPA examples/vision/pretrained/mnist_fc_3layer.pth"},
    ).materialize()


def load_mnist_images(shared_dir, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` MNIST test images of ERAN's CSV, pixels / 255, and their labels."""
    rows = np.loadtxt(shared_dir / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=k, ndmin=2)
    return rows[:, 1:] / 255.0, rows[:, 0].astype(int)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Multi-threaded BLAS on many small batched products is pathological on this shared 2-core machine
    (STACK.md): 30x slower.  One thread, as the benchmarks do."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def mnist(shared_dir):
    net = load_mnist_fc(shared_dir)
    X, y = load_mnist_images(shared_dir)
    return net, X, y


def _check_image(net, x0, rng, *, n_sample, entries, methods=METHODS):
    c = int(net.forward(x0).argmax())
    for eps in EPS:
        region = Region.of(net, x0, eps, math.inf)
        pts = [sample_region(region, n_sample, rng)]
        if eps > 0:
            pts.append(jacobian_attack_points(net, region, rng, entries=entries, steps=12))
            pts.append(neuron_attack_points(net, region, rng, neurons_per_layer=1, steps=8))
            pts.append(hill_climb(region, lambda Z: np.abs(net.jacobian(Z)[:, c, :]).sum(axis=1), rng, starts=4, steps=20))
        X = np.vstack(pts)
        Js = net.jacobian(X)
        g_l1 = np.abs(Js[:, c, :]).sum(axis=1).max()
        for method in methods:
            jb = jacobian_bounds(net, x0, eps, math.inf, method=method)
            assert jb.lower.shape == (10, 784)
            inside = (Js >= jb.lower) & (Js <= jb.upper)
            assert inside.all(), (method, eps, int((~inside).sum()))
            res = lipschitz(net, x0, eps, math.inf, method=method, outputs=c)
            pt = res.points[0]
            assert pt.lipschitz >= g_l1, (method, eps, pt.lipschitz, g_l1)
            if eps == 0:
                assert pt.lipschitz == pytest.approx(np.abs(net.jacobian(x0)[c]).sum(), rel=1e-9)
                np.testing.assert_allclose(jb.lower, net.jacobian(x0), rtol=1e-9, atol=1e-12)


def test_network_loads_and_classifies(mnist):
    net, X, y = mnist
    assert net.widths == (784, 128, 64, 10)
    assert (net.forward(X).argmax(axis=1) == y).all()


@pytest.mark.parametrize("index", [0, 1])
def test_mnist_containment_and_lipschitz(mnist, rng, index):
    net, X, y = mnist
    _check_image(net, X[index], rng, n_sample=200, entries=2)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_mnist_containment_and_lipschitz_full(mnist, rng, index):
    net, X, y = mnist
    _check_image(net, X[index], rng, n_sample=2000, entries=8)


def test_mnist_ordering(mnist):
    """On this ReLU network RecurJac-B is never looser than Fast-Lip (mean width) and its Lipschitz constant is
    never larger, at every radius."""
    net, X, y = mnist
    x0 = X[0]
    c = int(net.forward(x0).argmax())
    for eps in EPS[1:]:
        wb = jacobian_bounds(net, x0, eps, method="recurjac-b").width.mean()
        wf = jacobian_bounds(net, x0, eps, method="fastlip").width.mean()
        assert wb <= wf * (1 + 1e-12)
        lb = lipschitz(net, x0, eps, method="recurjac-b", outputs=c).points[0].lipschitz
        lf = lipschitz(net, x0, eps, method="fastlip", outputs=c).points[0].lipschitz
        assert lb <= lf * (1 + 1e-12)
