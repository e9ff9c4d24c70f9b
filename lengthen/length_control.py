"""Word-count constraints: the suffixes added to training queries and the LonGen length score.

Four constraint types, as in LonGen and Self-Lengthen's `add_length_control`: about N, between A and B,
at least A (LonGen: "more than"), at most B ("less than"). Training queries get a constraint derived from
the response they are paired with, so the response always meets it. Evaluation checks a model's output
against the constraint with LonGen's length score.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

TYPES = ("about", "range", "above", "below")
SUFFIX = {
    "about": "Write about {n} words.",
    "range": "Write between {a} and {b} words.",
    "above": "Write at least {a} words.",
    "below": "Write at most {b} words.",
}


@dataclass(frozen=True)
class Constraint:
    type: str       # about | range | above | below
    n: int          # the number the instruction states (about: N; range: A; above: A; below: B)
    lower: float    # the scored interval [lower, upper] in words
    upper: float
    text: str       # the sentence appended to the query

    def to_dict(self) -> dict:
        return {"type": self.type, "n": self.n, "lower": self.lower, "upper": self.upper, "text": self.text}


def scored_bounds(kind: str, a: int, b: int | None = None) -> tuple[float, float]:
    """LonGen's interval that scores 1: about N -> [0.8N, 1.2N]; range -> [A, B]; above A -> [A, 1.5A];
    below B -> [0.5B, B] (QwenLM/Self-Lengthen eval/length_following_eval.py)."""
    if kind == "about":
        return 0.8 * a, 1.2 * a
    if kind == "range":
        if b is None or b < a:
            raise ValueError(f"range constraint needs lower <= upper, got {a}, {b}")
        return float(a), float(b)
    if kind == "above":
        return float(a), 1.5 * a
    if kind == "below":
        return 0.5 * a, float(a)
    raise ValueError(f"unknown constraint type {kind!r}; known: {', '.join(TYPES)}")


def constraint(kind: str, a: int, b: int | None = None) -> Constraint:
    """The constraint of `kind` stating `a` (and `b` for range), with its scored interval and sentence."""
    lower, upper = scored_bounds(kind, a, b)
    text = SUFFIX[kind].format(n=a, a=a, b=b if kind == "range" else a)
    return Constraint(kind, a, lower, upper, text)


def length_score(words: int, lower: float, upper: float) -> float:
    """LonGen length score in [0, 100]: 100 inside [lower, upper]; below, 100 * max(2w/lower - 1, 0)
    (0 at half the lower bound); above, 100 * max(3 - 2w/upper, 0) (0 at 1.5x the upper bound)."""
    if lower <= words <= upper:
        return 100.0
    if words < lower:
        return 100.0 * max(2.0 * words / lower - 1.0, 0.0)
    return 100.0 * max(3.0 - 2.0 * words / upper, 0.0)


def rounding_unit(words: int) -> int:
    """The step numbers are rounded to: 10 below 100 words, 100 below 1,000, else 1,000 (the published
    recipe rounds 2K-8K-word responses to thousands; short responses need finer steps)."""
    return 10 if words < 100 else 100 if words < 1000 else 1000


def constraint_for(words: int, kind: str) -> Constraint:
    """A constraint of `kind` that a `words`-word response meets, in round numbers (after `num_round`)."""
    unit = rounding_unit(words)
    near = max(unit, round(words / unit) * unit)
    lo, hi = math.floor(words / unit) * unit, math.ceil(words / unit) * unit
    if lo == hi:  # an exact multiple: widen so that the range has two distinct ends
        lo = lo - unit if lo > unit else lo
        hi = hi + unit if lo == hi else hi
    lo = max(lo, 1)
    candidates = {"about": ("about", near, None), "range": ("range", lo, hi), "above": ("above", lo, None),
                  "below": ("below", hi, None)}
    c = constraint(*candidates[kind])
    if not c.lower <= words <= c.upper:  # very short texts round far from their count: state the count itself
        c = constraint(kind, words, words) if kind == "range" else constraint(kind, words)
    return c


def pick_type(weights: dict[str, float], rng: random.Random) -> str:
    kinds = [k for k in TYPES if weights.get(k, 0) > 0]
    return rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
