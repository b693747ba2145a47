"""The rounding allowance on the paper's CIFAR shape (issue 12, part 2): at most 1% of the bound width.

3072-2048-2048-1024-1024-512-512-256-256-128-10 ReLU, He-uniform (seed 2019), zero biases, ``x0 ~ U[-0.5, 0.5]``,
l-inf, the predicted class's logit, default layer bounds.  The previous allowance (``gamma(N_t)`` times the
magnitude chain, about 1e11 times the values here) made RecurJac-B's bounds about twice as wide as the uncertified
computation; the running allowance must cost at most 1% of every entry's width.  Slow (about a minute of CPU per
radius for B): run with ``-m slow``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale import jacobian_bounds
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network

CIFAR_WIDTHS = (3072, 2048, 2048, 1024, 1024, 512, 512, 256, 256, 128, 10)


@pytest.fixture(scope="module")
def cifar():
    rng = np.random.default_rng(2019)
    net = random_network(CIFAR_WIDTHS, "relu", rng, bias_scale=0.0)
    x0 = rng.uniform(-0.5, 0.5, CIFAR_WIDTHS[0])
    pred = int(np.argmax(net.forward(x0[None])[0]))
    return net, x0, pred


@pytest.mark.slow
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("method", ["recurjac-b", "fastlip"])
def test_rounding_share_at_most_one_percent(cifar, method, eps):
    net, x0, pred = cifar
    lb = layer_bounds(net.with_outputs(np.eye(CIFAR_WIDTHS[-1])[[pred]]), x0, eps, math.inf)
    jb = jacobian_bounds(net, x0, eps, math.inf, method=method, layer_bounds=lb, outputs=pred, keep_states=False)
    assert jb.allowance.shape == jb.lower.shape == (1, CIFAR_WIDTHS[0])
    assert np.isfinite(jb.lower).all() and np.isfinite(jb.upper).all()
    assert 0.0 < jb.rounding_share <= 0.01, jb.rounding_share
    assert jb.to_dict(arrays=False)["rounding_share"] == jb.rounding_share
