"""CPU check of the division sequence in ec_device.cuh `softmax_divide` against exact rounding.

For float32 x in [2^-60, 1] (softmax numerators) and y in [1, 2^20] (their sums), with a
reciprocal r anywhere within +-`--ulps` ulp of 1/y (MUFU.RCP plus one Newton step lands within
1 ulp), the three operations q0 = RN(x * r), rem = fma(-y, q0, x), q = fma(r, rem, q0) must
give RN(x / y). Exact arithmetic with fractions (fma = one rounding of the exact value).
Run 2026-11-30 (fourth session): 140000 pairs, +-1 and +-2 ulp, no mismatch.

Usage: python3 benchmark/check_softmax_divide.py [--n 20000] [--seed 0] [--ulps 1]
"""
import argparse
import random
from fractions import Fraction

import numpy as np


def rn32(v: Fraction) -> np.float32:
    """v rounded to the nearest float32, ties to even (normal range)."""
    a = np.float32(float(v))
    best = None
    for c in (np.nextafter(a, np.float32(-np.inf)), a, np.nextafter(a, np.float32(np.inf))):
        d = abs(Fraction(float(c)) - v)
        even = (int(np.float32(c).view(np.uint32)) & 1) == 0
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    return np.float32(best[1])


def fma(a, b, c) -> np.float32:
    return rn32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ulps", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    bad = 0
    for _ in range(a.n):
        x = np.float32(2.0 ** rng.uniform(-60, 0)) if rng.random() < 0.5 else np.float32(rng.uniform(0.5, 1))
        y = np.float32(2.0 ** rng.uniform(0, 20)) if rng.random() < 0.5 else np.float32(rng.uniform(1, 600))
        want = rn32(Fraction(float(x)) / Fraction(float(y)))
        r0 = rn32(Fraction(1) / Fraction(float(y)))
        for step in range(-a.ulps, a.ulps + 1):
            r = r0
            for _ in range(abs(step)):
                r = np.nextafter(r, np.float32(2 if step > 0 else 0))
            q0 = rn32(Fraction(float(x)) * Fraction(float(r)))
            q = fma(r, fma(-y, q0, x), q0)
            if q != want:
                bad += 1
                print(f"mismatch x={x!r} y={y!r} r={r!r}: {q!r} != {want!r}")
    print(f"checked {a.n} pairs x {2 * a.ulps + 1} reciprocals: {bad} mismatches")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
