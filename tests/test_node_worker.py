"""The inference worker on its own (no ROS): queue bounds and policies, frame pairing, errors, tracking.

The model is the real tiny pipeline (edited to always segment, see node_support). Where a test needs
the model busy or failing on demand, a subclass holds it at a gate or raises for one query.
"""

import threading
import time

import pytest

from lisa_core.errors import InputError
from lisa_core.pipeline import LisaPipeline
from lisa_ros.status import Status
from lisa_ros.worker import STAGE_QUEUED, Frame, InferenceWorker, Query, WorkerSettings, clean_query
from node_support import scene, write_segmenting_model

IMAGE_TOPIC = "/camera/image_raw"


class GatedPipeline(LisaPipeline):
    """Waits at `gate` before each segment (alone or batched), and raises for the query text 'explode'
    (a batch holding it fails as a whole)."""

    gate: threading.Event
    entered: threading.Event

    def _enter(self, queries):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        if "explode" in queries:
            raise RuntimeError("simulated fault inside the model")

    def segment(self, image, query, **kwargs):
        self._enter([query])
        return super().segment(image, query, **kwargs)

    def segment_many(self, requests):
        self._enter([request.query for request in requests])
        return super().segment_many(requests)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_segmenting_model(tmp_path_factory.mktemp("worker") / "model")


@pytest.fixture(scope="module")
def loaded_pipeline(model_dir):
    return GatedPipeline.from_pretrained(model_dir, max_new_tokens=1)


@pytest.fixture
def pipeline(loaded_pipeline):
    loaded_pipeline.gate, loaded_pipeline.entered = threading.Event(), threading.Event()
    loaded_pipeline.gate.set()
    yield loaded_pipeline
    loaded_pipeline.gate.set()


class Harness:
    def __init__(self, load, **settings):
        settings.setdefault("max_image_age", 0.0)  # a slow first run must not make frames 'too old'
        self.outcomes, self.states, self.errors = [], [], []
        self.lock = threading.Lock()
        self.worker = InferenceWorker(load, self._outcome, self.states.append, WorkerSettings(**settings),
                                      lambda camera: IMAGE_TOPIC, self.errors.append)
        self.frame_keys = iter(range(1, 10_000))
        self.worker.start()

    def _outcome(self, outcome):
        with self.lock:
            self.outcomes.append(outcome)

    def frame(self, index=0, received=None):
        frame = Frame(scene(index), header=f"frame-{index}", received=received or time.monotonic(),
                      key=next(self.frame_keys))
        self.worker.submit_frame(frame)
        return frame

    def query(self, query_id, text="where is the box?", **fields):
        self.worker.submit(Query(query_id, text, time.monotonic(), **fields))

    def wait(self, condition, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out; outcomes: {self.by_id()}"
            time.sleep(0.01)

    def by_id(self):
        with self.lock:
            return {o.query.id: o for o in self.outcomes if not o.tracked}

    def wait_for_ids(self, *ids):
        self.wait(lambda: set(ids) <= set(self.by_id()))
        return [self.by_id()[i] for i in ids]


def test_query_is_answered_on_the_newest_frame(pipeline):
    harness = Harness(lambda: pipeline)
    harness.frame(0)
    newest = harness.frame(1)
    harness.query("q-1")
    (outcome,) = harness.wait_for_ids("q-1")
    assert outcome.success and outcome.status == Status.OK and outcome.error is None
    assert outcome.frame is newest and outcome.frame.header == "frame-1"
    assert outcome.result.answer == "[SEG]" and outcome.result.targets[0].area > 0
    assert len(harness.states) == 1 and harness.states[0].startswith("model loaded in")
    assert harness.worker.stop(2.0)


def test_targets_below_min_confidence_are_left_out(pipeline):
    harness = Harness(lambda: pipeline)
    harness.frame(0)
    harness.query("q-1")
    (kept,) = harness.wait_for_ids("q-1")
    confidence = kept.result.targets[0].confidence
    harness.worker.update_settings(min_confidence=min(1.0, confidence + 0.01))
    harness.query("q-2")
    (filtered,) = harness.wait_for_ids("q-2")
    assert filtered.success and filtered.result.answer == kept.result.answer and filtered.result.targets == []
    harness.worker.stop(2.0)


def test_no_frame_and_too_old_frame_are_errors_that_name_why(pipeline):
    harness = Harness(lambda: pipeline, max_image_age=0.5)
    harness.query("q-1")
    (no_frame,) = harness.wait_for_ids("q-1")
    assert no_frame.error == f"no frame yet: no image received on {IMAGE_TOPIC}"
    assert no_frame.status == Status.NO_FRAME and not no_frame.success
    harness.frame(0, received=time.monotonic() - 3.0)
    harness.query("q-2")
    (too_old,) = harness.wait_for_ids("q-2")
    assert too_old.error.startswith("frame too old") and "max_image_age 0.5 s" in too_old.error
    assert too_old.status == Status.FRAME_TOO_OLD and IMAGE_TOPIC in too_old.error
    harness.worker.update_settings(max_image_age=0.0)
    harness.query("q-3")
    assert harness.wait_for_ids("q-3")[0].success, "max_image_age 0 accepts any age"
    harness.worker.stop(2.0)


@pytest.mark.parametrize("policy, dropped, answered", [
    ("drop_oldest", ["q-2", "q-3"], ["q-1", "q-4", "q-5"]),
    ("reject_new", ["q-4", "q-5"], ["q-1", "q-2", "q-3"]),
])
def test_full_queue_drops_by_policy_and_every_query_gets_one_outcome(pipeline, policy, dropped, answered):
    harness = Harness(lambda: pipeline, queue_size=2, overflow_policy=policy)
    stages = {f"q-{index}": [] for index in range(1, 6)}

    def query(query_id):
        harness.query(query_id, on_progress=lambda stage, text, tokens: stages[query_id].append(stage))

    harness.frame(0)
    pipeline.gate.clear()
    query("q-1")
    assert pipeline.entered.wait(30)  # q-1 is inside the model; the queue holds 2 more
    for index in range(2, 6):
        query(f"q-{index}")
    assert harness.worker.queue_length == 2
    drops = harness.wait_for_ids(*dropped)
    for outcome in drops:
        assert outcome.error.startswith("dropped: queue full") and outcome.query.id in outcome.error
        assert policy in outcome.error and outcome.status == Status.QUEUE_FULL
    pipeline.gate.set()
    outcomes = harness.wait_for_ids(*answered)
    assert all(o.success and o.status == Status.OK for o in outcomes)
    time.sleep(0.2)
    with harness.lock:
        ids = [o.query.id for o in harness.outcomes]
    assert sorted(ids) == [f"q-{i}" for i in range(1, 6)], "exactly one outcome per query"
    queued = [query_id for query_id, seen in stages.items() if seen[:1] == [STAGE_QUEUED]]
    assert queued == sorted(set(answered) | set(dropped) if policy == "drop_oldest" else answered), (
        f"every query that entered the queue is told so first, a rejected one never: {stages}")
    harness.worker.stop(2.0)


def test_model_error_fails_that_query_only(pipeline):
    harness = Harness(lambda: pipeline)
    harness.frame(0)
    pipeline.gate.clear()
    harness.query("q-0")
    assert pipeline.entered.wait(30)  # q-1 and q-2 wait, then go to the model as one batch
    harness.query("q-1", "explode")
    harness.query("q-2")
    pipeline.gate.set()
    first, failed, fine = harness.wait_for_ids("q-0", "q-1", "q-2")
    assert failed.error == "model error: RuntimeError: simulated fault inside the model"
    assert failed.status == Status.MODEL_ERROR
    assert any(line.startswith("batch of 2 failed") for line in harness.errors), harness.errors
    assert any("simulated fault" in line for line in harness.errors), "the traceback goes to the log"
    assert first.success and fine.success, "the batch's other query is answered on its own"
    harness.worker.stop(2.0)


def test_bad_input_from_the_model_is_named(pipeline):
    harness = Harness(lambda: pipeline)
    harness.frame(0)
    # Room for 1000 new tokens leaves the 1024-token model no room for its prompt: the pipeline refuses.
    harness.query("q-1", max_new_tokens=1000)
    (too_long,) = harness.wait_for_ids("q-1")
    assert too_long.status == Status.BAD_QUERY and too_long.error.startswith("bad query: ")
    assert "max_new_tokens" in too_long.error, too_long.error
    two_channel_key, thin_key = next(harness.frame_keys), next(harness.frame_keys)
    harness.worker.submit_frame(Frame(scene(0)[:, :, :2], "two-channel", time.monotonic(), two_channel_key))
    harness.query("q-2")
    (two_channels,) = harness.wait_for_ids("q-2")
    assert two_channels.status == Status.BAD_IMAGE and two_channels.error.startswith("bad image: ")
    assert "got (120, 160, 2)" in two_channels.error, two_channels.error
    harness.worker.submit_frame(Frame(scene(0, height=2, width=200), "thin", time.monotonic(), thin_key))
    harness.query("q-3")
    (thin,) = harness.wait_for_ids("q-3")
    assert thin.status == Status.BAD_IMAGE and thin.error.startswith("bad image: 200x2: one side is more than")
    harness.frame(1)
    harness.query("q-4")
    assert harness.wait_for_ids("q-4")[0].success, "the next good frame is answered"
    harness.worker.stop(2.0)


def test_model_that_fails_to_load_still_answers_every_query(tmp_path):
    def load():
        return LisaPipeline.from_pretrained(tmp_path / "missing")
    harness = Harness(load)
    harness.query("q-1")
    (outcome,) = harness.wait_for_ids("q-1")
    assert outcome.error.startswith("model not loaded: CheckpointError") and "missing" in outcome.error
    assert outcome.status == Status.MODEL_NOT_LOADED and harness.worker.model_error in outcome.error
    assert harness.states == ["model failed to load"] and not harness.worker.model_loaded
    harness.worker.stop(2.0)


def test_tracking_follows_new_frames_until_stopped_or_a_new_query(pipeline):
    harness = Harness(lambda: pipeline, tracking=True, track_rate_hz=100.0)
    harness.frame(0)
    harness.query("q-1")
    (answer,) = harness.wait_for_ids("q-1")
    assert harness.worker.tracking_query_id() == "q-1"
    for index in range(1, 4):
        frame = harness.frame(index)
        harness.wait(lambda: any(o.tracked and o.frame is frame for o in list(harness.outcomes)))
    with harness.lock:
        tracked = [o for o in harness.outcomes if o.tracked]
    assert [o.frame.header for o in tracked] == ["frame-1", "frame-2", "frame-3"]
    assert all(o.query.id == "q-1" and o.status == Status.OK and o.result.answer == answer.result.answer
               and o.result.targets[0].area > 0 for o in tracked)
    assert harness.worker.stop_tracking() == "q-1"
    harness.frame(4)
    time.sleep(0.3)
    assert len([o for o in harness.outcomes if o.tracked]) == 3, "no tracking after stop"
    harness.query("q-2")
    harness.wait_for_ids("q-2")
    harness.query("q-3")  # ends q-2's tracking at once
    assert harness.worker.tracking_query_id() is None
    harness.worker.stop(2.0)


def test_stop_gives_waiting_queries_an_error(pipeline):
    harness = Harness(lambda: pipeline)
    harness.frame(0)
    pipeline.gate.clear()
    harness.query("q-1")
    assert pipeline.entered.wait(30)
    harness.query("q-2")
    assert not harness.worker.stop(0.2), "q-1 is still inside the model"
    waiting, abandoned = harness.wait_for_ids("q-2", "q-1")
    assert waiting.error == "node shutting down: query not answered"
    assert abandoned.error == "node shutting down: inference abandoned"
    assert waiting.status == abandoned.status == Status.SHUTTING_DOWN
    pipeline.gate.set()
    assert harness.worker.stop(30), "the abandoned inference ends by itself"
    time.sleep(0.1)
    with harness.lock:
        assert sorted(o.query.id for o in harness.outcomes) == ["q-1", "q-2"], "one outcome each, no late answer"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="queue_size"):
        WorkerSettings(queue_size=0)
    with pytest.raises(ValueError, match="overflow_policy"):
        WorkerSettings(overflow_policy="drop_all")


@pytest.mark.parametrize("text, expected", [
    ("  where is the cup?\n", "where is the cup?"),
    ("cut\x00 this\x1b paper", "cut  this  paper"),
    ("line one\nline two\tend", "line one\nline two\tend"),
])
def test_queries_are_cleaned(text, expected):
    assert clean_query(text, 100) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty"), (" \t\n", "only whitespace"), ("\x00\x01", "control characters"),
    ("x" * 101, "101 characters, more than max_query_chars (100)"),
    ("ab\ufffd\ufffd", "not valid UTF-8 (undecodable bytes at character 2)"),
])
def test_bad_queries_are_refused_with_the_reason(text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        clean_query(text, 100)
