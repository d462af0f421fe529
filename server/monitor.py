"""Monitoring what users get: a windowed-mean drop detector on served accuracy.

The detector (documented in the README): after every evaluated round, take the mean
served accuracy across the evaluated devices; keep the mean of the last ``window``
of those (the *windowed mean*) and the best windowed mean seen so far (the
*baseline*). An alert fires when the windowed mean is more than ``drop`` below the
baseline; the baseline is then reset to the current windowed mean, so one lasting
shift fires once, and a further drop fires again. Why this and not Page-Hinkley: one
threshold in accuracy points that an operator can read, and a delay bounded by the
window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class DropDetector:
    window: int
    drop: float
    recent: deque[float] = field(default_factory=deque)
    baseline: float | None = None

    def update(self, value: float) -> tuple[float, float] | None:
        """Add one round's mean; ``(windowed mean, baseline)`` when an alert fires."""
        self.recent.append(value)
        if len(self.recent) > self.window:
            self.recent.popleft()
        if len(self.recent) < self.window:
            return None
        mean = sum(self.recent) / self.window
        if self.baseline is None or mean > self.baseline:
            self.baseline = mean
            return None
        if mean < self.baseline - self.drop:
            fired = (mean, self.baseline)
            self.baseline = mean
            return fired
        return None
