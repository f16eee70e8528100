"""Runs the model off the ROS executor: a bounded query queue, the newest camera frame, and tracking.

One thread owns the pipeline (loads it, then answers queries and tracks), so executor callbacks only
hand over work and never wait for the model. Every submitted query gets exactly one outcome through
`on_outcome`: a result, or an error naming why. No ROS imports: the node adapts messages to this.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from lisa_core.errors import InputError
from lisa_core.result import SegmentationResult

OVERFLOW_POLICIES = ("drop_oldest", "reject_new")
# A frame arriving up to this fraction of the tracking period early is not held back: a camera
# running at track_rate_hz, with jitter, gets every frame tracked without delay.
TRACK_JITTER_TOLERANCE = 0.1
# Control characters other than tab and newline become spaces in instructions.
_KEPT_CONTROLS = {"\t", "\n"}
# rclpy decodes a string message's invalid UTF-8 bytes to this character.
_UNDECODABLE = "\ufffd"


def clean_query(text: str, max_chars: int) -> str:
    """The instruction as the model gets it, or InputError naming what is wrong with it."""
    if len(text) > max_chars:
        raise InputError(f"bad query: {len(text)} characters, more than max_query_chars ({max_chars})")
    if _UNDECODABLE in text:
        raise InputError("bad query: the instruction is not valid UTF-8 (undecodable bytes at character "
                         f"{text.index(_UNDECODABLE)})")
    cleaned = "".join(" " if unicodedata.category(c) == "Cc" and c not in _KEPT_CONTROLS else c
                      for c in text).strip()
    if not cleaned:
        raise InputError("bad query: the instruction is empty" + (" (only whitespace or control characters)"
                                                                  if text else ""))
    return cleaned


@dataclass(frozen=True)
class Frame:
    """One converted camera image and what identifies it."""

    image: np.ndarray  # HxWx3 uint8 RGB
    header: Any  # the image message's header, copied onto everything computed from this frame
    received: float  # time.monotonic() when it arrived
    key: int  # increasing per frame; the pipeline caches the SAM image embedding under it


@dataclass
class Query:
    """One instruction waiting for its outcome."""

    id: str
    text: str
    received: float  # time.monotonic() when it arrived
    image: Optional[Frame] = None  # answer on this frame instead of the camera's newest


@dataclass
class Outcome:
    """What became of a query: `result` on success, else `error` says why.

    `tracked` outcomes re-apply an earlier answer's [SEG] prompts to a newer frame; their latency is
    counted from that frame's arrival instead of from the query's.
    """

    query: Query
    frame: Optional[Frame]
    result: Optional[SegmentationResult]
    error: Optional[str]
    latency_s: float
    tracked: bool = False

    @property
    def success(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WorkerSettings:
    """What may change while running (the node's dynamic parameters)."""

    queue_size: int = 4
    overflow_policy: str = "drop_oldest"
    max_image_age: float = 1.0  # seconds; 0 accepts frames of any age
    max_new_tokens: int = 0  # 0 = the model's default
    max_query_chars: int = 2000
    min_confidence: float = 0.0  # targets with a lower SAM IoU prediction are left out
    tracking: bool = False
    track_rate_hz: float = 10.0

    def __post_init__(self):
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow_policy must be one of {OVERFLOW_POLICIES}, got {self.overflow_policy!r}")
        if self.max_image_age < 0 or self.max_new_tokens < 0 or self.track_rate_hz <= 0 or self.max_query_chars < 1:
            raise ValueError("max_image_age and max_new_tokens must be >= 0, track_rate_hz > 0 and "
                             "max_query_chars >= 1")


@dataclass
class _Tracking:
    query: Query
    answer: str
    prompts: list  # the [SEG] prompt embeddings of the answer's targets
    last_frame: Frame  # the last frame tracked (at first, the answered one)


class InferenceWorker:
    """Owns the pipeline in one thread; `submit` and `submit_frame` are safe from any thread.

    `load_pipeline()` is called once in the worker thread; until it returns, queries wait in the queue,
    and if it raises, every query gets a 'model not loaded' error naming why.
    `on_outcome(outcome)` and `on_state(event)` are called from the worker thread, except the outcome
    of a query dropped by `submit`, which is delivered in the submitting thread.
    """

    def __init__(self, load_pipeline: Callable[[], Any], on_outcome: Callable[[Outcome], None],
                 on_state: Callable[[str], None], settings: WorkerSettings, frame_source: str,
                 log_error: Callable[[str], None]):
        self._load_pipeline = load_pipeline
        self._on_outcome = on_outcome
        self._on_state = on_state
        self._settings = settings
        self._frame_source = frame_source
        self._log_error = log_error
        self._condition = threading.Condition()
        self._queue: collections.deque[Query] = collections.deque()
        self._newest_frame: Optional[Frame] = None
        self._tracking: Optional[_Tracking] = None
        self._stopping = False
        self._pipeline = None
        self.model_error: Optional[str] = None
        self.model_loaded = False
        self.busy = False
        self._in_model: Optional[Query] = None  # the query being answered; cleared before delivery
        self._thread = threading.Thread(target=self._run, name="lisa-inference", daemon=True)

    # ---- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stops the thread; queued queries get a 'shutting down' error. If inference is still running
        after `timeout` seconds, its query gets that error instead of its answer, the daemon thread is
        abandoned, and this returns False."""
        with self._condition:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._condition.notify_all()
        for query in waiting:
            self._deliver(self._error(query, None, "node shutting down: query not answered"))
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._condition:
            abandoned, self._in_model = self._in_model, None
        if abandoned is not None:
            self._deliver(self._error(abandoned, None, "node shutting down: inference abandoned"))
        return False

    @property
    def settings(self) -> WorkerSettings:
        return self._settings

    def update_settings(self, **changes) -> None:
        """Applies new settings (validated by WorkerSettings); a smaller queue drops its oldest queries."""
        settings = dataclasses.replace(self._settings, **changes)
        dropped = []
        with self._condition:
            self._settings = settings
            while len(self._queue) > settings.queue_size:
                dropped.append(self._queue.popleft())
            if not settings.tracking:
                self._tracking = None
            self._condition.notify_all()
        for query in dropped:
            self._deliver(self._error(query, None, f"dropped: queue full (queue_size reduced to "
                                                   f"{settings.queue_size}); query {query.id} not answered"))

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def tracking_query_id(self) -> Optional[str]:
        tracking = self._tracking
        return tracking.query.id if tracking is not None else None

    def submit(self, query: Query) -> None:
        """Queues a query (its text cleaned); a new query also ends tracking. A bad query, or one
        dropped on overflow, gets its error outcome now, in this thread."""
        try:
            query.text = clean_query(query.text, self._settings.max_query_chars)
        except InputError as error:
            # The outcome echoes at most max_query_chars of a refused text: results stay as small as an
            # accepted query's (a 100 kB result held up every later one to a reader in the tests).
            query.text = query.text[:self._settings.max_query_chars]
            self._deliver(self._error(query, None, str(error)))
            return
        dropped: Optional[Outcome] = None
        with self._condition:
            size, policy = self._settings.queue_size, self._settings.overflow_policy
            full = len(self._queue) >= size
            if self._stopping:
                dropped = self._error(query, None, "node shutting down: query not answered")
            elif full and policy == "reject_new":
                dropped = self._error(query, None, f"dropped: queue full ({size} waiting, policy reject_new); "
                                                   f"query {query.id} not answered")
            else:
                if full:
                    oldest = self._queue.popleft()
                    dropped = self._error(oldest, None, f"dropped: queue full ({size} waiting, policy "
                                                        f"drop_oldest); query {oldest.id} replaced by {query.id}")
                self._queue.append(query)
                self._tracking = None
                self._condition.notify_all()
        if dropped is not None:
            self._deliver(dropped)

    def submit_frame(self, frame: Frame) -> None:
        with self._condition:
            self._newest_frame = frame
            if self._tracking is not None:
                self._condition.notify_all()

    def stop_tracking(self) -> Optional[str]:
        """Ends tracking; returns the id of the query that was being tracked, if any."""
        with self._condition:
            stopped, self._tracking = self._tracking, None
        return stopped.query.id if stopped is not None else None

    # ---- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._pipeline = self._load_pipeline()
            self.model_loaded = True
            self._on_state(f"model loaded in {time.monotonic() - started:.1f} s")
        except Exception as error:  # any failure to load is reported, and queries still get answers
            self.model_error = f"{type(error).__name__}: {error}"
            self._log_error(f"model failed to load: {self.model_error}")
            self._on_state("model failed to load")
        while True:
            with self._condition:
                job = self._next_job()
                if job is None:
                    return
                self.busy = True
                self._in_model = job if isinstance(job, Query) else None
            try:
                if isinstance(job, Query):
                    outcome = self._answer(job)
                    with self._condition:
                        answered_here = self._in_model is job  # else stop() gave it its outcome
                        self._in_model = None
                    if answered_here:
                        self._deliver(outcome)
                else:
                    self._track(*job)
            finally:
                self.busy = False

    def _next_job(self):
        """Waits (holding the condition) for a query, a tracking step that is due, or stopping."""
        while not self._stopping:
            if self._queue:
                return self._queue.popleft()
            tracking, frame = self._tracking, self._newest_frame
            timeout = None
            if tracking is not None and frame is not None and frame.key > tracking.last_frame.key:
                # At most track_rate_hz by arrival time; an early frame waits (and newer ones replace it).
                period = (1.0 - TRACK_JITTER_TOLERANCE) / self._settings.track_rate_hz
                due = tracking.last_frame.received + period
                now = time.monotonic()
                if now >= due:
                    tracking.last_frame = frame
                    return tracking, frame
                timeout = due - now
            self._condition.wait(timeout)
        return None

    def _answer(self, query: Query) -> Outcome:
        if self._pipeline is None:
            return self._error(query, None, f"model not loaded: {self.model_error}")
        frame = query.image or self._newest_frame
        if frame is None:
            return self._error(query, None, f"no frame yet: no image received on {self._frame_source}")
        settings = self._settings
        age = time.monotonic() - frame.received
        if query.image is None and 0 < settings.max_image_age < age:
            return self._error(query, frame, f"frame too old: the newest image from {self._frame_source} "
                                             f"arrived {age:.2f} s ago (max_image_age {settings.max_image_age} s)")
        try:
            result = self._pipeline.segment(frame.image, query.text, frame_key=frame.key,
                                            max_new_tokens=settings.max_new_tokens or None)
        except InputError as error:
            return self._error(query, frame, f"bad query or image: {error}")
        except Exception as error:  # the model failing on one query must not end the service
            self._log_error(f"model error on query {query.id}:\n{traceback.format_exc()}")
            return self._error(query, frame, f"model error: {type(error).__name__}: {error}")
        if settings.min_confidence > 0:  # SAM's IoU prediction can be negative: 0 keeps every target
            result.targets = [t for t in result.targets if t.confidence >= settings.min_confidence]
        with self._condition:
            if (settings.tracking and result.targets and query.image is None and not self._queue
                    and not self._stopping):
                self._tracking = _Tracking(query, result.answer, [t.prompt_embedding for t in result.targets],
                                           frame)
        return Outcome(query, frame, result, None, time.monotonic() - query.received)

    def _track(self, tracking: _Tracking, frame: Frame) -> None:
        max_age = self._settings.max_image_age
        if 0 < max_age < time.monotonic() - frame.received:
            return  # a stale frame is not worth a mask; wait for the camera
        try:
            targets = self._pipeline.track(frame.image, tracking.prompts, frame_key=frame.key)
        except Exception as error:  # reported on the tracked query's result; tracking ends
            self._log_error(f"tracking error for query {tracking.query.id}:\n{traceback.format_exc()}")
            with self._condition:
                if self._tracking is tracking:
                    self._tracking = None
            self._deliver(Outcome(tracking.query, frame, None,
                                  f"tracking stopped: model error: {type(error).__name__}: {error}",
                                  time.monotonic() - frame.received, tracked=True))
            return
        with self._condition:
            if self._tracking is not tracking:
                return  # a new query or a stop arrived meanwhile: this mask belongs to the past
        result = SegmentationResult(query=tracking.query.text, answer=tracking.answer, targets=list(targets),
                                    image_size=frame.image.shape[:2])
        self._deliver(Outcome(tracking.query, frame, result, None, time.monotonic() - frame.received,
                              tracked=True))

    # ---- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _error(query: Query, frame: Optional[Frame], reason: str) -> Outcome:
        return Outcome(query, frame, None, reason, time.monotonic() - query.received)

    def _deliver(self, outcome: Outcome) -> None:
        try:
            self._on_outcome(outcome)
        except Exception:  # publishing failed (e.g. during shutdown): log, keep serving
            self._log_error(f"could not deliver the outcome of query {outcome.query.id}:\n"
                            f"{traceback.format_exc()}")
