"""From results to events: a start after a few frames in a row, updates while it stays, an end
after ``post_roll`` seconds without it.

One event per label at a time (``any`` gives each label its own). A label must match on
``debounce`` consecutive results to start an event (one stray detection is noise); the event's
start is the first of those results, so the pre-roll counts back from when it was first seen. It
ends ``post_roll`` seconds after the label was last seen; one longer than ``max_length`` is ended
and, if the label is still there, a new one starts at once (an endless event would never be
kept); after an end, the label cannot start a new event for ``cooldown`` seconds (a label that
flickers at the edge of the threshold is one event, not dozens).

Pure logic on (timestamp, items): no I/O, no clock of its own, so it is tested frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from inference.events.rules import ANY, Rule, matching
from inference.result import Item

Box = Optional[Tuple[float, float, float, float]]


@dataclass
class Transition:
    kind: str  # "start", "update" (a better frame), "end"
    label: str
    at: float  # the start for "start", the frame's time for "update", the end for "end"
    prob: float = 0.0
    box: Box = None
    reason: str = ""  # for "end": "gone", "max_length", "stopped"


@dataclass
class _Track:
    streak: int = 0
    first_at: float = 0.0  # first result of the current streak
    active: bool = False
    started: float = 0.0
    last_seen: float = 0.0
    best: float = 0.0
    cooldown_until: float = float("-inf")
    pending: List[Tuple[float, float, Box]] = field(default_factory=list)  # the streak's frames


class Tracker:
    def __init__(self, rules: Sequence[Rule], debounce: int = 3, post_roll: float = 5.0,
                 max_length: float = 300.0, cooldown: float = 5.0) -> None:
        self.rules = list(rules)
        self.debounce = max(1, int(debounce))
        self.post_roll = float(post_roll)
        self.max_length = float(max_length)
        self.cooldown = float(cooldown)
        self._tracks: Dict[str, _Track] = {}

    @property
    def active_labels(self) -> List[str]:
        return [label for label, t in self._tracks.items() if t.active]

    def _seen(self, items: Sequence[Item]) -> Dict[str, Tuple[float, Box]]:
        """The best matching item per event label in one result."""
        seen: Dict[str, Tuple[float, Box]] = {}
        for item in items:
            rule = matching(self.rules, item.label, item.name, item.prob)
            if rule is None:
                continue
            key = item.name if rule.label == ANY else rule.label
            if key not in seen or item.prob > seen[key][0]:
                seen[key] = (item.prob, item.box)
        return seen

    def feed(self, at: float, items: Sequence[Item]) -> List[Transition]:
        out: List[Transition] = []
        seen = self._seen(items)
        for label in set(seen) | set(self._tracks):
            track = self._tracks.setdefault(label, _Track())
            if label in seen:
                prob, box = seen[label]
                self._present(label, track, at, prob, box, out)
            else:
                self._absent(label, track, at, out)
        # forget labels with nothing going on, so `any` on a 1000-class model stays small
        for label in [k for k, t in self._tracks.items()
                      if not t.active and not t.streak and t.cooldown_until < at]:
            del self._tracks[label]
        return out

    def _present(self, label: str, track: _Track, at: float, prob: float, box: Box,
                 out: List[Transition]) -> None:
        track.last_seen = at
        if track.active and at - track.started >= self.max_length:
            # split: the next event starts at once, no debounce or cooldown in between
            self._end(label, track, at, "max_length", out)
            track.active, track.started, track.best = True, at, prob
            track.cooldown_until = float("-inf")
            out.append(Transition("start", label, at, prob, box))
            return
        if track.active:
            if prob > track.best:
                track.best = prob
                out.append(Transition("update", label, at, prob, box))
            return
        if at < track.cooldown_until:
            track.streak = 0
            track.pending.clear()
            return
        if not track.streak:
            track.first_at = at
        track.streak += 1
        track.pending.append((at, prob, box))
        if track.streak >= self.debounce:
            best_at, best, best_box = max(track.pending, key=lambda p: p[1])
            track.active, track.started, track.best = True, track.first_at, best
            track.pending.clear()
            out.append(Transition("start", label, track.first_at, best, best_box))

    def _absent(self, label: str, track: _Track, at: float, out: List[Transition]) -> None:
        track.streak = 0
        track.pending.clear()
        if track.active and at - track.last_seen >= self.post_roll:
            self._end(label, track, at, "gone", out)

    def _end(self, label: str, track: _Track, at: float, reason: str,
             out: List[Transition]) -> None:
        out.append(Transition("end", label, at, track.best, None, reason))
        track.active = False
        track.streak = 0
        track.best = 0.0
        track.cooldown_until = at + self.cooldown

    def end_all(self, at: float, reason: str = "stopped") -> List[Transition]:
        """End every open event (the recorder stops)."""
        out: List[Transition] = []
        for label, track in self._tracks.items():
            if track.active:
                self._end(label, track, at, reason, out)
        return out
