"""Real network: auto_LiRPA's MNIST 784-128-64-10 ReLU MLP on the first 10 ERAN MNIST test images (pixels/255,
domain [0, 1]) at eps = 0.01, l-inf: every method's bounds contain the sampled and attacked pre-activations; the
unstable neurons per layer are printed (run with -s) and sanity-checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.layer_bounds import Region, layer_bounds
from recurjac_scale.network.model import InputSpec, Network
from recurjac_scale.testing import neuron_attack_points, sample_region


@pytest.fixture(scope="module")
def mnist(shared_dir):
    z = np.load(shared_dir / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz")
    H = int(z["n_layers"])
    acts = [str(a) for a in z["acts"]]
    assert acts == ["relu", "relu", "linear"]
    net = Network(
        [z[f"W{i}"].astype(np.float64) for i in range(H)],
        [z[f"b{i}"].astype(np.float64) for i in range(H)],
        acts[:-1],
        input_spec=InputSpec(shape=(784,), domain_lower=0.0, domain_upper=1.0),
    )
    rows = np.loadtxt(shared_dir / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=10)
    return net, rows[:, 1:] / 255.0, rows[:, 0].astype(int)


def _run(mnist, rng, n_samples, neurons, steps):
    net, X, labels = mnist
    assert (net.forward(X).argmax(axis=1) == labels).mean() >= 0.9
    eps = 0.01
    report = {m: [] for m in ("ibp", "fastlin", "crown")}
    widths = {m: 0.0 for m in report}
    for x0 in X:
        region = Region.of(net, x0, eps, math.inf)
        P = np.vstack(
            [sample_region(region, n_samples, rng),
             neuron_attack_points(net, region, rng, neurons_per_layer=neurons, steps=steps)]
        )
        zs = net.pre_activations(P)
        res = {m: layer_bounds(net, x0, eps, math.inf, m) for m in report}
        for m, lb in res.items():
            for k, (z, l, u) in enumerate(zip(zs, lb.lower, lb.upper)):
                tol = 1e-12 * (1 + np.abs(z).max())
                assert (z >= l - tol).all() and (z <= u + tol).all(), (m, k)
            report[m].append(lb.unstable[:2])
            widths[m] += float(np.mean(np.concatenate([u - l for l, u in zip(lb.lower[:2], lb.upper[:2])])))
        # ordering on a real network
        for k in range(3):
            assert (res["crown"].upper[k] <= res["fastlin"].upper[k] + 1e-12).all()
            assert (res["crown"].lower[k] >= res["fastlin"].lower[k] - 1e-12).all()
        # unstable counts: crown <= fastlin <= ibp in total, and IBP's first layer equals the others'
        assert sum(res["crown"].unstable) <= sum(res["fastlin"].unstable) <= sum(res["ibp"].unstable)
        assert res["crown"].unstable[0] == res["ibp"].unstable[0]
    for m in report:
        print(f"mnist_fc_3layer eps=0.01 {m}: unstable per image (layer0, layer1) = {report[m]}, "
              f"mean hidden width {widths[m] / len(X):.4f}")


def test_mnist_fc_3layer_contained(mnist, rng):
    _run(mnist, rng, n_samples=2000, neurons=2, steps=8)


@pytest.mark.slow
def test_mnist_fc_3layer_contained_many_points(mnist, rng):
    _run(mnist, rng, n_samples=20_000, neurons=8, steps=20)
