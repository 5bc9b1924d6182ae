"""Recording rules: ``--record LABEL[:MIN_PROB]``, ``any`` for every label.

A rule matches a result item by its label name (case-insensitive) or its numeric id, at or above
its own minimum probability; the item has already passed ``--threshold`` (results below it are
never items), so ``person`` alone means "a person the dashboard shows".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

ANY = "any"


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    label: str  # lower case; ANY for every label
    min_prob: float = 0.0

    def matches(self, label_id: int, name: str, prob: float) -> bool:
        if prob < self.min_prob:
            return False
        return self.label == ANY or self.label == name.lower() or self.label == str(label_id)

    def __str__(self) -> str:
        return self.label if not self.min_prob else f"{self.label}:{self.min_prob:g}"


def parse_rule(text: str) -> Rule:
    """``person``, ``person:0.6``, ``any``, ``15:0.5`` (an id); RuleError says what is wrong."""
    text = str(text).strip()
    label, sep, prob_text = text.rpartition(":")
    label = (label if sep else text).strip().lower()
    if not label:
        raise RuleError(f"{text!r}: give a label name, an id or 'any' (LABEL[:MIN_PROB])")
    min_prob = 0.0
    if sep:
        try:
            min_prob = float(prob_text)
        except ValueError:
            raise RuleError(f"{text!r}: MIN_PROB must be a number from 0 to 1") from None
        if not math.isfinite(min_prob) or not 0.0 <= min_prob <= 1.0:
            raise RuleError(f"{text!r}: MIN_PROB must be a number from 0 to 1")
    return Rule(label, min_prob)


def parse_rules(texts: Iterable[str]) -> List[Rule]:
    return [parse_rule(t) for t in texts]


def matching(rules: Sequence[Rule], label_id: int, name: str, prob: float) -> Optional[Rule]:
    for rule in rules:
        if rule.matches(label_id, name, prob):
            return rule
    return None
