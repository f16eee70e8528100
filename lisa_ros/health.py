"""How the perception node is doing: frame rate, latency, outcome counts, and one verdict over them.

The meters are fed from executor callbacks and the worker thread and read by a diagnostics timer, so
each is thread-safe. `assess` turns a snapshot of them into a level, a reason and key/value strings
(the node copies these into a diagnostic_msgs/DiagnosticStatus). No ROS imports; clocks are injected.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from lisa_ros.status import Status

LEVELS = ("OK", "WARN", "ERROR")
OK, WARN, ERROR = LEVELS
TRACKED_KEY = "tracked"  # the OutcomeCounts key beside the status labels


class RateMeter:
    """Events per second over the last `window_s` seconds (or since creation, while that is shorter)."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._window_s = window_s
        self._clock = clock
        self._created = clock()
        self._ticks: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        now = self._clock()
        with self._lock:
            self._ticks.append(now)
            self._forget_locked(now)

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._forget_locked(now)
            span = min(self._window_s, now - self._created)
            return len(self._ticks) / span if span > 0 else 0.0

    def _forget_locked(self, now: float) -> None:
        while self._ticks and self._ticks[0] <= now - self._window_s:
            self._ticks.popleft()


class LatencyWindow:
    """The last `size` latencies, in seconds, and their percentiles (numpy's linear interpolation)."""

    def __init__(self, size: int = 200):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._latencies: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a latency must be a finite number of seconds >= 0, got {seconds}")
        with self._lock:
            self._latencies.append(seconds)

    def percentile(self, q: float) -> Optional[float]:
        """The q-th percentile (0 to 100) in seconds, or None before the first latency."""
        if not 0 <= q <= 100:
            raise ValueError(f"a percentile must be between 0 and 100, got {q}")
        with self._lock:
            latencies = list(self._latencies)
        return float(np.percentile(latencies, q)) if latencies else None


class OutcomeCounts:
    """How many outcomes ended with each status; tracked updates count under their status and under
    'tracked' as well."""

    def __init__(self):
        self._counts = {status: 0 for status in Status}
        self._tracked = 0
        self._lock = threading.Lock()

    def add(self, status: Status, tracked: bool = False) -> None:
        status = Status(status)
        with self._lock:
            self._counts[status] += 1
            self._tracked += bool(tracked)

    def snapshot(self) -> dict[str, int]:
        """Every status label (0 when none) and 'tracked'."""
        with self._lock:
            counts = {status.label: count for status, count in self._counts.items()}
            counts[TRACKED_KEY] = self._tracked
        return counts


@dataclass(frozen=True)
class HealthReport:
    """One verdict on the node."""

    level: str  # one of LEVELS
    message: str  # the first reason for the level, e.g. "no frame for 3.2 s (max_image_age 1.0 s)"
    values: dict[str, str]  # key -> value, everything the verdict was made from


def assess(*, model_state: str, model_error: Optional[str], seconds_since_frame: Optional[float],
           max_image_age: float, queue_length: int, queue_size: int, fps_in: float,
           latency_p50: Optional[float], latency_p95: Optional[float], counts: dict[str, int],
           last_error: Optional[str], active: bool) -> HealthReport:
    """ERROR when the model failed to load (model_state 'failed'); WARN when not active, when no frame
    came for longer than max_image_age (0: never) or when the query queue is full; else OK.

    `seconds_since_frame` is None before the first frame; `counts` is an OutcomeCounts snapshot. In the
    values, 'dropped' counts queue_full outcomes and 'failed' every other outcome without a result.
    """
    missing = [key for key in (*(status.label for status in Status), TRACKED_KEY) if key not in counts]
    if missing:
        raise ValueError(f"counts lacks {', '.join(missing)}: pass an OutcomeCounts snapshot")
    if max_image_age < 0 or queue_size < 1:
        raise ValueError(f"max_image_age must be >= 0 and queue_size >= 1, got {max_image_age} and {queue_size}")
    errors, warnings = [], []
    if model_state == "failed":
        errors.append(f"model failed to load: {model_error}")
    if not active:
        warnings.append("inactive")
    if max_image_age > 0:
        if seconds_since_frame is None:
            warnings.append("no frame received yet")
        elif seconds_since_frame > max_image_age:
            warnings.append(f"no frame for {seconds_since_frame:.1f} s (max_image_age {float(max_image_age)} s)")
    if queue_length >= queue_size:
        warnings.append(f"query queue full ({queue_length}/{queue_size})")
    level = ERROR if errors else WARN if warnings else OK
    reasons = errors + warnings
    dropped = counts[Status.QUEUE_FULL.label]
    failed = sum(counts[status.label] for status in Status if status is not Status.OK) - dropped
    values = {
        "model_state": model_state,
        "model_load_error": model_error or "",
        "active": str(active).lower(),
        "seconds_since_frame": "never" if seconds_since_frame is None else f"{seconds_since_frame:.1f}",
        "fps_in": f"{fps_in:.1f}",
        "queue": f"{queue_length}/{queue_size}",
        "latency_p50_ms": _milliseconds(latency_p50),
        "latency_p95_ms": _milliseconds(latency_p95),
        "dropped": str(dropped),
        "failed": str(failed),
        **{key: str(count) for key, count in counts.items()},
        "last_error": last_error or "",
    }
    return HealthReport(level=level, message=reasons[0] if reasons else "ok", values=values)


def _milliseconds(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"
