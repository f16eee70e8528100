"""Runs the model off the ROS executor: a bounded query queue, the newest frame per camera, tracking,
conversations, streaming and cancel.

One thread owns the pipeline (loads it, then answers queries and tracks), so executor callbacks only
hand over work and never wait for the model. Every submitted query gets exactly one outcome through
`on_outcome`: a result, or an error with its status code naming why. No ROS imports: the node adapts
messages to this.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import threading
import time
import traceback
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from lisa_core.errors import GenerationCancelled, InputError
from lisa_core.frames import check_aspect_ratio, prepare_image
from lisa_core.prompt import Turn
from lisa_core.result import Progress, SegmentationResult, SegmentRequest
from lisa_ros.conversations import ConversationStore, history_note
from lisa_ros.parameters import OVERFLOW_POLICIES
from lisa_ros.status import Status

# A frame arriving up to this fraction of the tracking period early is not held back: a camera
# running at track_rate_hz, with jitter, gets every frame tracked without delay.
TRACK_JITTER_TOLERANCE = 0.1
# Control characters other than tab and newline become spaces in instructions.
_KEPT_CONTROLS = {"\t", "\n"}
# rclpy decodes a string message's invalid UTF-8 bytes to this character.
_UNDECODABLE = "\ufffd"
# What the action's feedback calls the time before the model takes the query up.
STAGE_QUEUED = "queued"


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
    """One camera image and what identifies it.

    `image` is an HxWx3 uint8 RGB array once the worker has taken the frame; before, it may be what
    the worker's `prepare_frame` turns into one (the node's unconverted message: frames replaced before
    the worker takes them are never converted).
    """

    image: Any
    header: Any  # the image message's header, copied onto everything computed from this frame
    received: float  # time.monotonic() when it arrived
    key: int  # unique per frame; the pipeline caches the SAM image embedding under it
    camera: str = ""  # the camera's name in the node's `cameras` list; "" for the single camera
    paired: Any = None  # what `prepare_frame` paired with the frame when it was taken (the node: depth)


def _never() -> bool:
    return False


@dataclass(eq=False)
class Query:
    """One instruction waiting for its outcome.

    `on_progress(stage, text so far, tokens)` streams the answer (the action's feedback); the stage is
    STAGE_QUEUED or one of lisa_core.result.STAGES. `cancel_requested()` is polled before the model
    takes the query and after every generated token.
    """

    id: str
    text: str
    received: float  # time.monotonic() when it arrived
    camera: str = ""
    image: Optional[Frame] = None  # answer on this frame instead of the camera's newest
    conversation_id: str = ""  # "" is a one-shot query
    max_new_tokens: int = 0  # 0: the worker's setting
    on_progress: Optional[Callable[[str, str, int], None]] = None
    cancel_requested: Callable[[], bool] = field(default=_never)

    @property
    def batchable(self) -> bool:
        """One-shot, unstreamed queries may share one batched model call."""
        return self.on_progress is None and not self.conversation_id


@dataclass
class Outcome:
    """What became of a query: `result` when status is OK, else `error` says why.

    `tracked` outcomes re-apply an earlier answer's [SEG] prompts to a newer frame; their latency is
    counted from that frame's arrival instead of from the query's.
    """

    query: Query
    frame: Optional[Frame]
    result: Optional[SegmentationResult]
    error: Optional[str]
    latency_s: float
    status: Status = Status.OK
    tracked: bool = False
    history_turns: int = 0  # earlier turns of the conversation that were in the prompt
    turns_dropped: int = 0  # oldest turns left out by the conversation's limits
    notes: str = ""

    @property
    def success(self) -> bool:
        return self.status == Status.OK


@dataclass(frozen=True)
class WorkerSettings:
    """What may change while running (the node's dynamic parameters)."""

    queue_size: int = 4
    overflow_policy: str = "drop_oldest"
    max_image_age: float = 1.0  # seconds; 0 accepts frames of any age
    max_new_tokens: int = 0  # 0 = the model's default
    max_query_chars: int = 2000
    min_confidence: float = 0.0  # targets with a lower confidence are left out
    tracking: bool = False
    track_rate_hz: float = 10.0
    max_batch_size: int = 8  # queued one-shot queries answered in one model call, at most
    max_prompt_tokens: int = 0  # a conversation's prompt, at most; 0: the context window

    def __post_init__(self):
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow_policy must be one of {OVERFLOW_POLICIES}, got {self.overflow_policy!r}")
        if (self.max_image_age < 0 or self.max_new_tokens < 0 or self.track_rate_hz <= 0 or self.max_query_chars < 1
                or self.max_batch_size < 1 or self.max_prompt_tokens < 0):
            raise ValueError("max_image_age, max_new_tokens and max_prompt_tokens must be >= 0, track_rate_hz > 0, "
                             "max_query_chars and max_batch_size >= 1")


@dataclass
class _Tracking:
    query: Query
    answer: str
    prompts: list  # the [SEG] prompt embeddings of the answer's targets
    last_frame: Frame  # the last frame tracked (at first, the answered one)


class InferenceWorker:
    """Owns the pipeline in one thread; `submit`, `submit_frame` and the state changes are safe from
    any thread.

    `load_pipeline()` is called once in the worker thread; until it returns, queries wait in the queue,
    and if it raises, every query gets a MODEL_NOT_LOADED outcome naming why. `loaded` is set when
    loading has finished either way.
    `on_outcome(outcome)` and `on_state(event)` are called from the worker thread, except the outcome
    of a query refused by `submit`, which is delivered in the submitting thread.
    `prepare_frame(frame)` is called in the worker thread when it takes a frame for a query or a
    tracking step, and returns the frame to use (image converted, inputs paired with it); an InputError
    from it makes the query's outcome BAD_IMAGE.
    While inactive (`set_active(False)`), new queries get an INACTIVE outcome and tracking stops.
    """

    def __init__(self, load_pipeline: Callable[[], Any], on_outcome: Callable[[Outcome], None],
                 on_state: Callable[[str], None], settings: WorkerSettings, frame_source: Callable[[str], str],
                 log_error: Callable[[str], None], conversations: Optional[ConversationStore] = None,
                 prepare_frame: Callable[[Frame], Frame] = lambda frame: frame):
        """`frame_source(camera)` names a camera's image topic in error messages."""
        self._load_pipeline = load_pipeline
        self._prepare_frame = prepare_frame
        self._on_outcome = on_outcome
        self._on_state = on_state
        self._settings = settings
        self._frame_source = frame_source
        self._log_error = log_error
        self._conversations = conversations
        self._condition = threading.Condition()
        self._queue: collections.deque[Query] = collections.deque()
        self._newest_frames: dict[str, Frame] = {}
        self._tracking: dict[str, _Tracking] = {}
        self._stopping = False
        self._active = True
        self._pipeline = None
        self.model_error: Optional[str] = None
        self.model_loaded = False
        self.loaded = threading.Event()
        self.busy = False
        self._in_model: list[Query] = []  # the queries being answered; cleared before delivery
        self._thread = threading.Thread(target=self._run, name="lisa-inference", daemon=True)

    # ---- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float, release: bool = True) -> bool:
        """Stops the thread; queued queries get a SHUTTING_DOWN outcome. If inference is still running
        after `timeout` seconds, its queries get that outcome instead of their answers, the daemon
        thread is abandoned, and this returns False. `release=False` leaves the model's memory to the
        process's exit (freeing it takes a garbage collection pass, ~0.4 s even for a small model)."""
        with self._condition:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._condition.notify_all()
        for query in waiting:
            self._deliver(self._error(query, None, Status.SHUTTING_DOWN, "node shutting down: query not answered"))
        self._thread.join(timeout)
        if not self._thread.is_alive():
            if release:
                self._release_pipeline()
            return True
        with self._condition:
            abandoned, self._in_model = self._in_model, []
        for query in abandoned:
            self._deliver(self._error(query, None, Status.SHUTTING_DOWN, "node shutting down: inference abandoned"))
        return False

    def set_active(self, active: bool, reason: str = "node inactive") -> None:
        """Inactive: queued queries get an INACTIVE outcome with `reason`, tracking ends, new queries
        are refused; a query the model is answering still gets its answer."""
        with self._condition:
            self._active = active
            waiting = [] if active else list(self._queue)
            if not active:
                self._queue.clear()
                self._tracking.clear()
            self._condition.notify_all()
        for query in waiting:
            self._deliver(self._error(query, None, Status.INACTIVE, f"{reason}: query not answered"))

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
                self._tracking.clear()
            self._condition.notify_all()
        for query in dropped:
            self._deliver(self._error(query, None, Status.QUEUE_FULL,
                                      f"dropped: queue full (queue_size reduced to {settings.queue_size}); "
                                      f"query {query.id} not answered"))

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def tracking_query_id(self, camera: str = "") -> Optional[str]:
        tracking = self._tracking.get(camera)
        return tracking.query.id if tracking is not None else None

    def submit(self, query: Query) -> None:
        """Queues a query (its text cleaned); a new query also ends tracking on its camera. A bad
        query, or one refused or dropped, gets its error outcome now, in this thread."""
        try:
            query.text = clean_query(query.text, self._settings.max_query_chars)
        except InputError as error:
            # The outcome echoes at most max_query_chars of a refused text: results stay as small as an
            # accepted query's (a 100 kB result held up every later one to a reader in the tests).
            query.text = query.text[:self._settings.max_query_chars]
            self._deliver(self._error(query, None, Status.BAD_QUERY, str(error)))
            return
        dropped: Optional[Outcome] = None
        with self._condition:
            size, policy = self._settings.queue_size, self._settings.overflow_policy
            full = len(self._queue) >= size
            if self._stopping:
                dropped = self._error(query, None, Status.SHUTTING_DOWN, "node shutting down: query not answered")
            elif not self._active:
                dropped = self._error(query, None, Status.INACTIVE, "node inactive: query not answered")
            elif full and policy == "reject_new":
                dropped = self._error(query, None, Status.QUEUE_FULL,
                                      f"dropped: queue full ({size} waiting, policy reject_new); "
                                      f"query {query.id} not answered")
            else:
                if full:
                    oldest = self._queue.popleft()
                    dropped = self._error(oldest, None, Status.QUEUE_FULL,
                                          f"dropped: queue full ({size} waiting, policy drop_oldest); "
                                          f"query {oldest.id} replaced by {query.id}")
                if query.on_progress is not None:
                    # under the lock, so that "queued" comes before any stage the worker thread reports
                    query.on_progress(STAGE_QUEUED, "", 0)
                self._queue.append(query)
                self._tracking.pop(query.camera, None)
                self._condition.notify_all()
        if dropped is not None:
            self._deliver(dropped)

    def submit_frame(self, frame: Frame) -> None:
        with self._condition:
            self._newest_frames[frame.camera] = frame
            if frame.camera in self._tracking:
                self._condition.notify_all()

    def newest_frame(self, camera: str = "") -> Optional[Frame]:
        return self._newest_frames.get(camera)

    def stop_tracking(self, camera: str = "") -> Optional[str]:
        """Ends tracking on `camera`; returns the id of the query that was being tracked, if any."""
        with self._condition:
            stopped = self._tracking.pop(camera, None)
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
        finally:
            self.loaded.set()
        while True:
            with self._condition:
                job = self._next_job()
                if job is None:
                    return
                self.busy = True
                self._in_model = job if isinstance(job, list) else []
            try:
                if isinstance(job, list):
                    try:
                        outcomes = self._answer(job)
                    except Exception as error:  # a fault outside the model call: its queries still get an outcome
                        self._log_error(f"worker error:\n{traceback.format_exc()}")
                        outcomes = [self._error(query, None, Status.MODEL_ERROR,
                                                f"model error: {type(error).__name__}: {error}") for query in job]
                    with self._condition:
                        still_ours = {id(query) for query in self._in_model}
                        delivered_here = [outcome for outcome in outcomes if id(outcome.query) in still_ours]
                        self._in_model = []  # stop() gave the others their outcome
                    for outcome in delivered_here:
                        self._deliver(outcome)
                else:
                    self._track(*job)
            finally:
                self.busy = False

    def _next_job(self):
        """Waits (holding the condition) for queries, a tracking step that is due, or stopping.

        Queries come as a list: the first waiting one, with the batchable ones queued behind it when
        it is batchable (up to max_batch_size).
        """
        while not self._stopping:
            if self._queue:
                first = self._queue.popleft()
                batch = [first]
                if first.batchable:
                    for query in list(self._queue):
                        if len(batch) >= self._settings.max_batch_size:
                            break
                        if query.batchable:
                            self._queue.remove(query)
                            batch.append(query)
                return batch
            timeout = None
            now = time.monotonic()
            for camera, tracking in self._tracking.items():
                frame = self._newest_frames.get(camera)
                if frame is None or frame.key == tracking.last_frame.key:
                    continue
                # At most track_rate_hz by arrival time; an early frame waits (and newer ones replace it).
                due = tracking.last_frame.received + (1.0 - TRACK_JITTER_TOLERANCE) / self._settings.track_rate_hz
                if now >= due:
                    tracking.last_frame = frame
                    return tracking, frame
                timeout = due - now if timeout is None else min(timeout, due - now)
            self._condition.wait(timeout)
        return None

    def _answer(self, queries: list[Query]) -> list[Outcome]:
        """One outcome per query; the ones that pass the checks are answered together when several."""
        outcomes, ready = [], []
        for query in queries:
            refusal, frame = self._check(query)
            if refusal is not None:
                outcomes.append(refusal)
            else:
                ready.append((query, frame))
        if len(ready) > 1:
            try:
                results = self._pipeline.segment_many([
                    SegmentRequest(frame.image, query.text, frame_key=frame.key,
                                   max_new_tokens=query.max_new_tokens or self._settings.max_new_tokens or None)
                    for query, frame in ready])
            except Exception:  # one bad query must not fail the others: answer each on its own
                self._log_error(f"batch of {len(ready)} failed, answering one by one:\n{traceback.format_exc()}")
                outcomes.extend(self._answer_one(query, frame) for query, frame in ready)
            else:
                outcomes.extend(self._success(query, frame, result) for (query, frame), result in zip(ready, results))
        elif ready:
            outcomes.append(self._answer_one(*ready[0]))
        return outcomes

    def _check(self, query: Query) -> tuple[Optional[Outcome], Optional[Frame]]:
        """(refusal outcome, None), or (None, the frame to answer on)."""
        if self._pipeline is None:
            return self._error(query, None, Status.MODEL_NOT_LOADED, f"model not loaded: {self.model_error}"), None
        if query.cancel_requested():
            return self._error(query, None, Status.CANCELLED, "cancelled before the model took it up"), None
        frame = query.image or self._newest_frames.get(query.camera)
        if frame is None:
            return self._error(query, None, Status.NO_FRAME,
                               f"no frame yet: no image received on {self._frame_source(query.camera)}"), None
        age = time.monotonic() - frame.received
        max_age = self._settings.max_image_age
        if query.image is None and 0 < max_age < age:
            return self._error(query, frame, Status.FRAME_TOO_OLD,
                               f"frame too old: the newest image from {self._frame_source(query.camera)} "
                               f"arrived {age:.2f} s ago (max_image_age {max_age} s)"), None
        try:
            frame = self._prepare_frame(frame)
            prepare_image(frame.image)  # the model's own check: a frame it refuses is a bad image, not a bad query
            check_aspect_ratio(*frame.image.shape[:2])
        except InputError as error:
            return self._error(query, frame, Status.BAD_IMAGE, f"bad image: {error}"), None
        return None, frame

    def _answer_one(self, query: Query, frame: Frame) -> Outcome:
        settings = self._settings
        history = (self._conversations.history(query.conversation_id)
                   if self._conversations is not None and query.conversation_id else None)

        def progress(update: Progress) -> bool:
            if query.on_progress is not None:
                query.on_progress(update.stage, update.text, update.tokens)
            return self._stopping or query.cancel_requested()

        try:
            result = self._pipeline.segment(
                frame.image, query.text, frame_key=frame.key,
                max_new_tokens=query.max_new_tokens or settings.max_new_tokens or None,
                history=history.turns if history is not None else (),
                max_prompt_tokens=settings.max_prompt_tokens or None,
                on_progress=progress)
        except GenerationCancelled as cancelled:
            if self._stopping:
                return self._error(query, frame, Status.SHUTTING_DOWN, f"node shutting down: {cancelled}")
            return self._error(query, frame, Status.CANCELLED, f"cancelled: {cancelled}")
        except InputError as error:
            return self._error(query, frame, Status.BAD_QUERY, f"bad query: {error}")
        except Exception as error:  # the model failing on one query must not end the service
            self._log_error(f"model error on query {query.id}:\n{traceback.format_exc()}")
            return self._error(query, frame, Status.MODEL_ERROR, f"model error: {type(error).__name__}: {error}")
        outcome = self._success(query, frame, result)
        if history is not None:
            self._conversations.record(query.conversation_id, Turn(query.text, result.answer))
            outcome.history_turns = result.history_turns
            outcome.turns_dropped = history.dropped + result.turns_dropped
            outcome.notes = history_note(history.dropped, result.turns_dropped, history.expired,
                                         limits=self._conversations.limits)
        return outcome

    def _success(self, query: Query, frame: Frame, result: SegmentationResult) -> Outcome:
        settings = self._settings
        result.drop_unconfident(settings.min_confidence)
        with self._condition:
            if (settings.tracking and result.targets and query.image is None and self._active
                    and not any(q.camera == query.camera for q in self._queue) and not self._stopping):
                self._tracking[query.camera] = _Tracking(query, result.answer,
                                                         [t.prompt_embedding for t in result.targets], frame)
        return Outcome(query, frame, result, None, time.monotonic() - query.received)

    def _track(self, tracking: _Tracking, frame: Frame) -> None:
        max_age = self._settings.max_image_age
        if 0 < max_age < time.monotonic() - frame.received:
            return  # a stale frame is not worth a mask; wait for the camera
        camera = tracking.query.camera
        try:
            frame = self._prepare_frame(frame)
        except InputError as error:  # this frame only: tracking goes on with the next one
            self._deliver(Outcome(tracking.query, frame, None, f"bad image: {error}",
                                  time.monotonic() - frame.received, Status.BAD_IMAGE, tracked=True))
            return
        try:
            targets = self._pipeline.track(frame.image, tracking.prompts, frame_key=frame.key)
        except Exception as error:  # reported on the tracked query's result; tracking ends
            self._log_error(f"tracking error for query {tracking.query.id}:\n{traceback.format_exc()}")
            with self._condition:
                if self._tracking.get(camera) is tracking:
                    del self._tracking[camera]
            self._deliver(Outcome(tracking.query, frame, None,
                                  f"tracking stopped: model error: {type(error).__name__}: {error}",
                                  time.monotonic() - frame.received, Status.MODEL_ERROR, tracked=True))
            return
        with self._condition:
            if self._tracking.get(camera) is not tracking:
                return  # a new query or a stop arrived meanwhile: this mask belongs to the past
        result = SegmentationResult(query=tracking.query.text, answer=tracking.answer, targets=list(targets),
                                    image_size=frame.image.shape[:2])
        self._deliver(Outcome(tracking.query, frame, result, None, time.monotonic() - frame.received, tracked=True))

    # ---- helpers --------------------------------------------------------------------------------
    def _release_pipeline(self) -> None:
        """Drops the model (the worker thread has ended); on a GPU, its memory goes back to the driver."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        device = pipeline.device
        del pipeline
        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    @staticmethod
    def _error(query: Query, frame: Optional[Frame], status: Status, reason: str) -> Outcome:
        return Outcome(query, frame, None, reason, time.monotonic() - query.received, status)

    def _deliver(self, outcome: Outcome) -> None:
        try:
            self._on_outcome(outcome)
        except Exception:  # publishing failed (e.g. during shutdown): log, keep serving
            self._log_error(f"could not deliver the outcome of query {outcome.query.id}:\n"
                            f"{traceback.format_exc()}")
