"""Quality metrics with intervals (tokred.tasks.quality): the bootstrap FID/KID agree with torchmetrics on the
full sample, their intervals hold the estimate and narrow with more images, and proportions get Wilson intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokred.bench.contention import torch_threads
from tokred.tasks import quality as Q


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster, and much faster on a shared machine (no OpenMP spin-waiting)."""
    with torch_threads(1):
        yield


def features(n: int, d: int = 8, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) + shift


@pytest.mark.parametrize("n_fake, d", [(40, 8), (6, 8)])  # n > d and n < d (the Gram-matrix path)
def test_fid_bootstrap_formula_matches_torchmetrics(n_fake, d):
    real, fake = features(200, d), features(n_fake, d, shift=0.3, seed=1)
    identity = np.arange(n_fake)[None]
    ours = Q._fid_replicates(real.numpy(), fake.numpy(), identity)[0]
    assert ours == pytest.approx(Q.fid_from_features(real, fake), rel=1e-6, abs=1e-9)


def test_kid_bootstrap_formula_matches_torchmetrics():
    # equal set sizes and subsets of the full size: every torchmetrics subset is the whole sample
    real, fake = features(30), features(30, shift=0.5, seed=1)
    mean, std = Q.kid_from_features(real, fake, subsets=5)
    assert std == pytest.approx(0.0, abs=1e-9)
    ours = Q._kid_replicates(real.numpy(), fake.numpy(), np.arange(30)[None])[0]
    assert ours == pytest.approx(mean, rel=1e-6)


def test_fid_and_kid_intervals_hold_the_estimate_and_narrow_with_more_images():
    real = features(400, seed=0)
    widths = {}
    for n in (20, 160):
        fake = features(n, shift=0.4, seed=n)
        fid, (lo, hi) = Q.fid_with_ci(real, fake)
        assert lo <= fid <= hi
        kid, (klo, khi) = Q.kid_with_ci(real, fake)
        assert klo <= kid <= khi
        widths[n] = (hi - lo, khi - klo)
    assert widths[160][0] < 0.6 * widths[20][0] and widths[160][1] < 0.6 * widths[20][1]
    # a clearly different distribution is separated from a matching one at 160 images
    _, (near_lo, near_hi) = Q.fid_with_ci(real, features(160, seed=7))
    _, (far_lo, far_hi) = Q.fid_with_ci(real, features(160, shift=0.4, seed=8))
    assert near_hi < far_lo


def test_fid_interval_is_deterministic():
    real, fake = features(100), features(30, shift=0.2, seed=3)
    assert Q.fid_with_ci(real, fake) == Q.fid_with_ci(real, fake)


def test_proportion_and_mean_score():
    value, ci, n = Q.proportion([True] * 5 + [False] * 5)
    assert value == 50.0 and n == 10 and ci == pytest.approx((23.66, 76.34), abs=0.01)
    value, ci, n = Q.proportion(torch.tensor([True] * 10))
    assert value == 100.0 and ci[1] == 100.0 and ci[0] == pytest.approx(72.25, abs=0.01)
    mean, (lo, hi), n = Q.mean_score([30.0, 31.0, 29.0, 30.5, 29.5])
    assert mean == 30.0 and lo < 30.0 < hi and n == 5
    with pytest.raises(ValueError, match="no samples"):
        Q.proportion([])
    with pytest.raises(ValueError, match="KID needs at least two"):
        Q.kid_from_features(features(1), features(5))
