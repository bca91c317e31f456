"""Exact-fraction oracle of the signed KS statistic, straight from the definition (paper Eq. 3)."""

from fractions import Fraction


def brute_signed_ks(values, labels, cls):
    """Exact (D+, D−, location+, location−, sign) with Fractions, straight from the definition."""
    values = [float(v) + 0.0 for v in values]
    inside = [v for v, y in zip(values, labels) if y == cls]
    outside = [v for v, y in zip(values, labels) if y != cls]
    grid = sorted(set(values))
    diff = [
        Fraction(sum(o <= v for o in outside), len(outside)) - Fraction(sum(i <= v for i in inside), len(inside))
        for v in grid
    ]
    d_plus, d_minus = max(diff), -min(diff)
    loc_plus = grid[diff.index(d_plus)]
    loc_minus = grid[diff.index(-d_minus)]
    sign = 1 if d_plus >= d_minus else -1
    return d_plus, d_minus, loc_plus, loc_minus, sign
