"""The operating system's randomness behind DP noise and DP client samples: uniform doubles in
(0, 1) and Box–Muller normals with the right moments and distribution, fresh on every draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedprompt.federation.privacy.noise import SeededNoise, SystemNoise, noise_source
from fedprompt.federation.randomness import system_normal, system_sample, system_uniform

N = 200_000


def test_uniform_doubles_lie_in_the_open_unit_interval_with_the_uniform_moments():
    u = system_uniform(N)
    assert u.dtype == np.float64 and u.shape == (N,)
    assert u.min() > 0 and u.max() < 1
    # mean 1/2 and variance 1/12, within 6 standard errors
    assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / N)
    assert abs(u.var() - 1 / 12) < 6 * math.sqrt(1 / 180 / N)
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert (u * 2**53 - 0.5 == np.floor(u * 2**53)).all()  # (k + 1/2) / 2^53: 53 random bits each


def test_box_muller_normals_have_the_standard_normal_moments_and_distribution():
    z = system_normal(N + 1)  # odd: the last pair is cut
    assert z.shape == (N + 1,) and z.dtype == np.float64
    se = 1 / math.sqrt(N)
    assert abs(z.mean()) < 6 * se
    assert abs(z.var() - 1) < 6 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 6 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 6 * math.sqrt(24) * se
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert np.abs(z).max() < math.sqrt(-2 * math.log(2.0**-54)) + 1e-9  # the cut tail
    # the two halves of each pair are uncorrelated
    assert abs(np.corrcoef(z[0:N:2], z[1:N:2])[0, 1]) < 6 / math.sqrt(N / 2)


def test_every_draw_is_fresh():
    assert not np.array_equal(system_normal(16), system_normal(16))
    first = SystemNoise().normal({"a": (4, 2), "b": ()}, "dp-noise", 1)
    again = SystemNoise().normal({"a": (4, 2), "b": ()}, "dp-noise", 1)
    assert first["a"].shape == (4, 2) and first["b"].shape == ()
    assert not np.array_equal(first["a"].numpy(), again["a"].numpy())


def test_seeded_noise_repeats_and_the_mode_names_pick_the_source():
    a = SeededNoise(3).normal({"x": (5,)}, "dp-noise", 2)["x"]
    assert np.array_equal(a.numpy(), SeededNoise(3).normal({"x": (5,)}, "dp-noise", 2)["x"].numpy())
    assert isinstance(noise_source("system", 3), SystemNoise)
    assert isinstance(noise_source("reproducible-insecure", 3), SeededNoise)
    with pytest.raises(ValueError, match="unknown noise mode"):
        noise_source("run", 3)


def test_a_system_sample_is_a_uniform_subset():
    counts = np.zeros(10)
    for _ in range(3000):
        chosen = system_sample(range(10), 3)
        assert chosen == sorted(set(chosen)) and len(chosen) == 3
        counts[chosen] += 1
    assert stats.chisquare(counts).pvalue > 1e-4  # each id 900 times in expectation
