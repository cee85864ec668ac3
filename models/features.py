"""Causal windowed features of a multichannel series, and a standardizer fitted on training rows.

`window_features(x, window)` turns an (n, C) series into (n, 3·C) features, per channel in this
order: the value, the rolling mean and the rolling (population) standard deviation over the past
`window` samples. Sample t uses samples max(0, t − window + 1) .. t only — never a future one —
so the first window − 1 rows use the shorter history they have. Pure numpy, deterministic.

`kinds` chooses the features per channel from FEATURE_KINDS: `value`, `mean`, `std` and `dev`
(value − rolling mean: the short-term movement without the level). A channel whose level drifts
in normal operation (a pump's temperatures warm up for an hour) is given ("dev", "std"), so the
drift of its level is not mistaken for an anomaly.

`Standardizer.fit(train_rows)` stores per-feature mean and std (a std below `min_std` counts as
1, so a constant training feature neither blows up nor disappears); `transform` maps
(x − mean) / std and clips to ±`clip`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DRIFT_FEATURES",
    "FEATURES_PER_CHANNEL",
    "FEATURE_KINDS",
    "Standardizer",
    "channel_kinds",
    "feature_names",
    "window_features",
]

FEATURES_PER_CHANNEL = ("value", "mean", "std")
DRIFT_FEATURES = ("dev", "std")
FEATURE_KINDS = ("value", "mean", "std", "dev")


def channel_kinds(channels: int, detrend: Sequence[int] = ()) -> tuple[tuple[str, ...], ...]:
    """Per-channel feature kinds: FEATURES_PER_CHANNEL, or DRIFT_FEATURES for `detrend` channels."""
    bad = [c for c in detrend if not 0 <= c < channels]
    if bad:
        raise ValueError(f"detrend channels {bad} out of range for {channels} channels")
    return tuple(DRIFT_FEATURES if c in detrend else FEATURES_PER_CHANNEL for c in range(channels))


def window_features(
    x: np.ndarray, window: int, kinds: Sequence[Sequence[str]] | None = None
) -> np.ndarray:
    """(n, C) series → (n, F) float64 features, per channel in `kinds` order, causal.

    Without `kinds` every channel gives [value, mean, std] (F = 3·C).
    """
    data = np.asarray(x, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise ValueError(f"expected an (n, channels) array, got shape {data.shape}")
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    n, channels = data.shape
    # Pad the past with NaN so every row sees exactly `window` slots; NaNs are ignored below.
    padded = np.concatenate([np.full((window - 1, channels), np.nan), data])
    views = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # (n, C, window)
    valid = ~np.isnan(views)
    count = valid.sum(axis=2)
    filled = np.where(valid, views, 0.0)
    mean = filled.sum(axis=2) / count
    var = np.where(valid, (filled - mean[:, :, None]) ** 2, 0.0).sum(axis=2) / count
    std = np.sqrt(var)
    if kinds is None:
        kinds = (FEATURES_PER_CHANNEL,) * channels
    if len(kinds) != channels:
        raise ValueError(f"kinds gives {len(kinds)} channels, the series has {channels}")
    per = {"value": data, "mean": mean, "std": std, "dev": data - mean}
    cols = []
    for c, ks in enumerate(kinds):
        for k in ks:
            if k not in per:
                raise ValueError(f"unknown feature kind {k!r} (known: {', '.join(FEATURE_KINDS)})")
            cols.append(per[k][:, c])
    return np.stack(cols, axis=1) if cols else np.empty((n, 0))


def feature_names(
    channels: Sequence[str], kinds: Sequence[Sequence[str]] | None = None
) -> list[str]:
    """Names of window_features' columns for the given channel names."""
    kinds = kinds if kinds is not None else (FEATURES_PER_CHANNEL,) * len(channels)
    return [f"{c}.{f}" for c, ks in zip(channels, kinds, strict=True) for f in ks]


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    std: np.ndarray
    clip: float

    @classmethod
    def fit(cls, rows: np.ndarray, clip: float = 8.0, min_std: float = 1e-6) -> Standardizer:
        data = np.asarray(rows, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"need ≥ 2 training rows of shape (n, F), got {data.shape}")
        mean = data.mean(axis=0)
        std = data.std(axis=0)
        std = np.where(std < min_std, 1.0, std)
        return cls(mean, std, float(clip))

    def transform(self, rows: np.ndarray) -> np.ndarray:
        z = (np.asarray(rows, dtype=np.float64) - self.mean) / self.std
        out: np.ndarray = np.clip(z, -self.clip, self.clip)
        return out
