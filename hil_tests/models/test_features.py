"""Causal window features and the standardizer (numpy only, generated data)."""

from __future__ import annotations

import numpy as np
import pytest

from models.features import Standardizer, feature_names, window_features


def _naive(x: np.ndarray, w: int) -> np.ndarray:
    n, c = x.shape
    out = np.zeros((n, 3 * c))
    for t in range(n):
        past = x[max(0, t - w + 1) : t + 1]
        for j in range(c):
            out[t, 3 * j] = x[t, j]
            out[t, 3 * j + 1] = sum(past[:, j]) / len(past)
            m = out[t, 3 * j + 1]
            out[t, 3 * j + 2] = (sum((v - m) ** 2 for v in past[:, j]) / len(past)) ** 0.5
    return out


@pytest.mark.parametrize("window", [1, 3, 10])
def test_matches_naive_computation(window: int) -> None:
    x = np.random.default_rng(1).normal(size=(40, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    np.testing.assert_allclose(window_features(x, window), _naive(x, window), atol=1e-9)


def test_causal_future_changes_never_touch_the_past() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 4))
    base = window_features(x, 7)
    for t in (0, 6, 50, 98):
        y = x.copy()
        y[t + 1 :] = rng.normal(size=y[t + 1 :].shape) * 100 + 1000
        changed = window_features(y, 7)
        np.testing.assert_array_equal(changed[: t + 1], base[: t + 1])
        assert not np.array_equal(changed[t + 1], base[t + 1])


def test_layout_and_names() -> None:
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    f = window_features(x, 2)
    assert f.shape == (2, 6)
    np.testing.assert_allclose(f[1], [3.0, 2.0, 1.0, 30.0, 20.0, 10.0])
    assert feature_names(["a", "b"]) == ["a.value", "a.mean", "a.std", "b.value", "b.mean", "b.std"]
    assert window_features(np.arange(5.0), 2).shape == (5, 3)  # 1-D: one channel


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        window_features(np.zeros((5, 2)), 0)
    with pytest.raises(ValueError):
        window_features(np.zeros((2, 2, 2)), 3)


def test_standardizer_fits_train_rows_and_clips() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(500, 3)) * [2.0, 0.5, 1.0] + [10.0, -1.0, 0.0]
    train[:, 2] = 7.0  # constant: std counts as 1
    s = Standardizer.fit(train, clip=4.0)
    z = s.transform(train)
    np.testing.assert_allclose(z[:, :2].mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z[:, :2].std(0), 1.0, atol=1e-9)
    assert s.std[2] == 1.0
    np.testing.assert_array_equal(z[:, 2], 0.0)
    far = s.transform(np.array([[1e6, -1e6, 7.5]]))
    np.testing.assert_allclose(far, [[4.0, -4.0, 0.5]])
    with pytest.raises(ValueError):
        Standardizer.fit(np.zeros((1, 3)))


def test_kinds_choose_and_order_features_per_channel() -> None:
    from models.features import channel_kinds

    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    kinds = channel_kinds(2, detrend=[1])
    assert kinds == (("value", "mean", "std"), ("dev", "std"))
    f = window_features(x, 2, kinds)
    np.testing.assert_allclose(f[1], [3.0, 2.0, 1.0, 10.0, 10.0])  # dev = 30 − 20
    assert feature_names(["a", "b"], kinds)[3:] == ["b.dev", "b.std"]
    with pytest.raises(ValueError, match="unknown feature kind 'x'"):
        window_features(x, 2, [("x",), ("value",)])
    with pytest.raises(ValueError, match="kinds gives 1 channels, the series has 2"):
        window_features(x, 2, [("value",)])
    with pytest.raises(ValueError, match=r"detrend channels \[5\] out of range"):
        channel_kinds(2, detrend=[5])
