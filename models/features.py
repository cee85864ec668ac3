"""Causal windowed features of a multichannel series, and a standardizer fitted on training rows.

`window_features(x, window)` turns an (n, C) series into (n, 3·C) features, per channel in this
order: the value, the rolling mean and the rolling (population) standard deviation over the past
`window` samples. Sample t uses samples max(0, t − window + 1) .. t only — never a future one —
so the first window − 1 rows use the shorter history they have. Pure numpy, deterministic.

`Standardizer.fit(train_rows)` stores per-feature mean and std (a std below `min_std` counts as
1, so a constant training feature neither blows up nor disappears); `transform` maps
(x − mean) / std and clips to ±`clip`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FEATURES_PER_CHANNEL", "Standardizer", "feature_names", "window_features"]

FEATURES_PER_CHANNEL = ("value", "mean", "std")


def window_features(x: np.ndarray, window: int) -> np.ndarray:
    """(n, C) series → (n, 3·C) float64 features [value, mean, std] per channel, causal."""
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
    out = np.empty((n, channels * 3))
    out[:, 0::3] = data
    out[:, 1::3] = mean
    out[:, 2::3] = std
    return out


def feature_names(channels: list[str]) -> list[str]:
    """Names of window_features' columns for the given channel names."""
    return [f"{c}.{f}" for c in channels for f in FEATURES_PER_CHANNEL]


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
