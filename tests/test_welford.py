"""Welford / Chan merging against float64 numpy."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from fisher_pipeline.welford import Welford


def test_matches_numpy_float64():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((101, 5, 3)).astype(np.float32) ** 2 * 1e3 + 1e4  # large mean, small spread
    state = Welford.zeros((5, 3))
    for start in range(0, len(data), 7):
        state.update(torch.from_numpy(data[start:start + 7]))
    reference = data.astype(np.float64)
    np.testing.assert_allclose(state.mean.numpy(), reference.mean(0), rtol=1e-13)
    np.testing.assert_allclose(state.variance.numpy(), reference.var(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(state.standard_error.numpy(), reference.std(0, ddof=1) / np.sqrt(101), rtol=1e-9)
    assert state.count == 101


def test_shards_merge_in_any_order_equal_one_pass():
    rng = np.random.default_rng(1)
    shards = [torch.from_numpy(rng.standard_normal((n, 4))) for n in (1, 5, 9, 2)]
    one_pass = Welford.zeros((4,))
    one_pass.update(torch.cat(shards))
    for order in itertools.permutations(range(len(shards))):
        merged = Welford.zeros((4,))
        for i in order:
            part = Welford.zeros((4,))
            part.update(shards[i])
            merged.merge(part)
        torch.testing.assert_close(merged.mean, one_pass.mean, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(merged.m2, one_pass.m2, rtol=1e-12, atol=1e-13)
        assert merged.count == one_pass.count


def test_single_sample_variance_is_nan_and_mean_only_state():
    state = Welford.zeros((2,))
    state.update(torch.tensor([[1.0, 2.0]]))
    assert torch.isnan(state.variance).all()
    mean_only = Welford.zeros((2,), track_m2=False)
    mean_only.update(torch.tensor([[1.0, -1.0], [3.0, 1.0]]))
    torch.testing.assert_close(mean_only.mean, torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert mean_only.m2 is None
