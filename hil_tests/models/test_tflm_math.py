"""models.tflm_math against hand-derived vectors and exact-rational definitions."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.tflm_math import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

int32 = st.integers(INT32_MIN, INT32_MAX)


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        (0.0, (0, 0)),
        (0.5, (1 << 30, 0)),
        (1.0, (1 << 30, 1)),
        (0.25, (1 << 30, -1)),
        (0.75, (3 << 29, 0)),
        (1 - 2**-40, (1 << 30, 1)),  # q·2^31 rounds up to 2^31: halved, shift + 1
        (2**-40, (0, 0)),  # shift below −31 flushes to zero
        (-0.5, (-(1 << 30), 0)),
        (0.1, (1717986918, -3)),  # round(0.8 · 2^31) = 1717986918.4 → down
    ],
)
def test_quantize_multiplier_vectors(real: float, expected: tuple[int, int]) -> None:
    assert quantize_multiplier(real) == expected


def test_quantize_multiplier_rounds_half_away_from_zero() -> None:
    # 0.5 + 2^-32 → q·2^31 = 2^30 + 0.5 exactly: std::round goes up.
    assert quantize_multiplier(0.5 + 2**-32) == ((1 << 30) + 1, 0)
    assert quantize_multiplier(-(0.5 + 2**-32)) == (-((1 << 30) + 1), 0)


@given(st.floats(min_value=1e-9, max_value=1e3))
def test_quantize_multiplier_represents_the_real(real: float) -> None:
    m, shift = quantize_multiplier(real)
    assert (1 << 30) <= m <= INT32_MAX
    assert abs(Fraction(m) * Fraction(2) ** (shift - 31) - Fraction(real)) <= Fraction(2) ** (
        shift - 32
    )


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (INT32_MIN, INT32_MIN, INT32_MAX),  # the one saturating case
        (INT32_MAX, INT32_MAX, INT32_MAX - 1),
        (INT32_MIN, INT32_MAX, -INT32_MAX),
        (1 << 30, 1 << 30, 1 << 29),
        (1, 1 << 30, 1),  # +0.5 rounds up
        (-1, 1 << 30, 0),  # −0.5 rounds toward zero
        (-3, 1 << 30, -1),  # −1.5 → −1
        (3, 1 << 30, 2),  # +1.5 → 2
        (-5, 3 << 29, -4),  # −3.75 → −4
        (0, INT32_MIN, 0),
    ],
)
def test_srdhm_vectors(a: int, b: int, expected: int) -> None:
    assert saturating_rounding_doubling_high_mul(a, b) == expected


@given(int32, int32)
def test_srdhm_is_rounded_doubled_high_product(a: int, b: int) -> None:
    if a == b == INT32_MIN:
        return
    exact = Fraction(a * b, 1 << 31)
    err = saturating_rounding_doubling_high_mul(a, b) - exact
    if a * b >= 0:
        assert Fraction(-1, 2) < err <= Fraction(1, 2)  # ties up
    else:
        assert Fraction(-1, 2) <= err < Fraction(1, 2)  # ties toward zero


@pytest.mark.parametrize(
    ("x", "e", "expected"),
    [
        (5, 1, 3),  # 2.5 → 3
        (-5, 1, -3),  # −2.5 → −3 (away from zero)
        (-4, 1, -2),
        (-6, 2, -2),  # −1.5 → −2
        (-5, 2, -1),  # −1.25 → −1
        (-7, 2, -2),  # −1.75 → −2
        (6, 2, 2),
        (12345, 0, 12345),
        (INT32_MIN, 31, -1),
        (INT32_MAX, 31, 1),
        (-(1 << 30), 31, -1),  # −0.5 → −1
        ((1 << 30) - 1, 31, 0),
    ],
)
def test_rounding_divide_by_pot_vectors(x: int, e: int, expected: int) -> None:
    assert rounding_divide_by_pot(x, e) == expected


@given(int32, st.integers(0, 31))
def test_rounding_divide_by_pot_rounds_half_away(x: int, e: int) -> None:
    exact = Fraction(x, 1 << e)
    got = rounding_divide_by_pot(x, e)
    assert abs(got - exact) <= Fraction(1, 2)
    if abs(got - exact) == Fraction(1, 2):
        assert abs(got) > abs(exact)


@pytest.mark.parametrize(
    ("x", "m", "shift", "expected"),
    [
        (100, 1 << 30, 0, 50),
        (100, 1 << 30, 2, 200),  # left shift first
        (-100, 1 << 30, -1, -25),
        (1, 1 << 30, -1, 1),  # 0.25 → 1: double rounding (single rounding gives 0)
        (-1, 1 << 30, -1, 0),  # −0.25: −0.5 → 0, then 0
        (-3, 1 << 30, -1, -1),  # −0.75: −1.5 → −1, −0.5 → −1
        (7, 1717986918, -3, 1),  # 7 · 0.1: 7 · 0.8 = 5.6 → 6, then 6/8 = 0.75 → 1
        (12345, 1717986918, -3, 1235),
        (-12345, 1717986918, -3, -1235),
        (INT32_MIN, INT32_MIN, 0, INT32_MAX),
        (0, 1 << 30, -31, 0),
    ],
)
def test_mbqm_vectors(x: int, m: int, shift: int, expected: int) -> None:
    assert multiply_by_quantized_multiplier(x, m, shift) == expected


def test_mbqm_refuses_int32_overflow() -> None:
    with pytest.raises(ValueError, match="outside int32"):
        multiply_by_quantized_multiplier(1 << 30, 1 << 30, 2)


@given(st.integers(-(1 << 20), 1 << 20), st.floats(min_value=1e-6, max_value=0.99))
def test_mbqm_is_within_one_of_the_real_product(x: int, real: float) -> None:
    m, shift = quantize_multiplier(real)
    got = multiply_by_quantized_multiplier(x, m, shift)
    assert abs(got - x * real) <= 1
