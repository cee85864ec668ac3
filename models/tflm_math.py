"""TFLM's fixed-point requantization, in exact Python integers, as an ESP32 computes it.

Each helper mirrors one function of tflite-micro (quantization_util.cc, common.h) or gemmlowp's
fixedpoint.h, including the cases where C's int32 arithmetic saturates or rounds toward zero.
"""

from __future__ import annotations

import math

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def _check_int32(name: str, value: int) -> None:
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{name}={value} is outside int32")


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """(multiplier, shift) for a double, as TFLM's QuantizeMultiplier computes them.

    real ≈ multiplier · 2^(shift − 31), with multiplier a Q31 int32 in [2^30, 2^31) (or 0).
    """
    if real_multiplier == 0.0:
        return 0, 0
    q, shift = math.frexp(real_multiplier)
    scaled = q * float(1 << 31)  # exact: a power-of-two scaling of a double
    # TfLiteRound is std::round: half away from zero.
    q_fixed = math.floor(abs(scaled) + 0.5)
    if scaled < 0:
        q_fixed = -q_fixed
    if q_fixed > (1 << 31):
        raise ValueError(f"multiplier {real_multiplier!r} does not fit Q31")
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if q_fixed > INT32_MAX:
        raise ValueError(f"multiplier {real_multiplier!r} does not fit int32")
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def saturating_rounding_doubling_high_mul(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32 a, b."""
    _check_int32("a", a)
    _check_int32("b", b)
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    n = ab + nudge
    # C's int64 division truncates toward zero; Python's // floors.
    return n >> 31 if n >= 0 else -((-n) >> 31)


def rounding_divide_by_pot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    _check_int32("x", x)
    if not 0 <= exponent <= 31:
        raise ValueError(f"exponent={exponent} is outside 0..31")
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def multiply_by_quantized_multiplier(x: int, multiplier: int, shift: int) -> int:
    """TFLM MultiplyByQuantizedMultiplier (the default, double-rounding build)."""
    left = shift if shift > 0 else 0
    right = -shift if shift < 0 else 0
    # x · 2^left is an int32 product in C; a wider value would be undefined behaviour there.
    shifted = x * (1 << left)
    _check_int32("x << left_shift", shifted)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)
