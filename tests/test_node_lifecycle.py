"""The node as a managed lifecycle node with the Query action and conversations, as a real process
over DDS: transitions through the lifecycle services, memory freed on cleanup, streamed feedback and
cancel, conversation turns, limits and reset, and a status code for every outcome.

One node process (autostart off) serves the module; the tests run in file order.
"""

import json
import time

import psutil
import pytest

from hardening_support import end_process, set_parameters, start_perception_node
from node_support import CAMERA_CODE, write_segmenting_model
from ros_support import ros_session, start_python, stop_process
from lisa_ros.status import Status

LONG_ANSWER = 300  # tokens: the test model writes [SEG] until max_new_tokens


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("lifecycle")) as session:
        yield session


@pytest.fixture(scope="module")
def node(ros):
    model = write_segmenting_model(ros["tmp"] / "segmenting_model")
    process, log = start_perception_node(ros, {
        "model_path": str(model), "autostart": False, "max_new_tokens": 2, "max_image_age": 10.0,
        "cpu_threads": 1, "diagnostics_rate_hz": 5.0})
    yield dict(process=process, log=log)
    end_process(process)


@pytest.fixture(scope="module")
def client(ros, node):
    from lisa_ros.client import PerceptionClient

    client = PerceptionClient(ros["context"], name="lifecycle_user", camera=False)
    assert client.wait_for(lambda: client.query_pub.get_subscription_count() > 0, 30), node["log"].read_text()
    yield client
    client.close()


@pytest.fixture(scope="module")
def camera(ros, client):
    stamps_file = ros["tmp"] / "camera_stamps.jsonl"
    stamps_file.touch()
    process = start_python(CAMERA_CODE, ros["env"], ros["tmp"] / "camera.log",
                           args=("--rate", "10", "--stamps-file", str(stamps_file)))
    # The camera publishes once the node subscribes, i.e. once it is active.
    yield lambda: [json.loads(line) for line in stamps_file.read_text().splitlines() if line]
    stop_process(process)


def _rss_mb(node) -> float:
    return psutil.Process(node["process"].pid).memory_info().rss / 2**20


def _memory_settled(node, seconds=1.5) -> float:
    time.sleep(seconds)
    return _rss_mb(node)


def test_unconfigured_node_answers_model_not_loaded(client, camera):
    assert client.lifecycle_state() == "unconfigured"
    result = client.query("Where is the red box?")
    assert result.status == Status.MODEL_NOT_LOADED and "unconfigured" in result.error, result.error


def test_a_transition_the_state_does_not_have_is_answered_false(client, node):
    for transition in ("activate", "deactivate", "cleanup"):  # none leaves the unconfigured state
        assert client.change_state(transition, timeout_s=10) is False
    assert client.lifecycle_state() == "unconfigured"
    assert "refused: not available in state unconfigured" in node["log"].read_text()
    assert client.query("Where is the red box?").status == Status.MODEL_NOT_LOADED


def test_lifecycle_round_trip_answers_only_while_active_and_cleanup_frees_the_model(client, node, camera, ros):
    figures = {"before configure": _memory_settled(node)}
    assert client.change_state("configure")
    assert client.lifecycle_state() == "inactive"
    figures["configured"] = _memory_settled(node)
    inactive = client.query("Where is the red box?")
    assert inactive.status == Status.INACTIVE and "inactive" in inactive.error, inactive.error

    assert client.change_state("activate") and client.lifecycle_state() == "active"
    assert client.wait_for(lambda: len(camera()) >= 3, 30), "the camera never saw the node subscribe"
    answered = client.query("Where is the red box?")
    assert answered.status == Status.OK, answered.error
    assert client.change_state("deactivate") and client.lifecycle_state() == "inactive"
    assert client.query("Where is the red box?").status == Status.INACTIVE

    for cycle in (1, 2, 3):
        assert client.change_state("cleanup") and client.lifecycle_state() == "unconfigured"
        figures[f"after cleanup {cycle}"] = _memory_settled(node)
        assert client.query("Where is the red box?").status == Status.MODEL_NOT_LOADED
        # A configure-time parameter changes while unconfigured, and is refused while configured.
        assert all(r.successful for r in set_parameters(client, precision="fp32"))
        assert client.change_state("configure") and client.change_state("activate")
        figures[f"configured {cycle + 1}"] = _memory_settled(node)
        refused = set_parameters(client, precision="bf16")[0]
        assert not refused.successful and "unconfigured" in refused.reason
        assert client.query("Where is the red box?").status == Status.OK
        if cycle < 3:
            assert client.change_state("deactivate")
    print("process memory (MB):", {k: round(v, 1) for k, v in figures.items()})
    # The tiny model is a few MB, below what the allocator's own caches move: what must hold is that
    # configure/cleanup cycles do not pile models up (test_cleanup_releases_the_pipeline checks the
    # release itself).
    assert figures["after cleanup 3"] - figures["after cleanup 2"] < 20, figures


def test_cleanup_releases_the_pipeline(tmp_path):
    """In-process: once the worker has stopped, nothing holds the pipeline any more."""
    import gc
    import weakref

    from lisa_core.pipeline import LisaPipeline
    from lisa_ros.worker import InferenceWorker, WorkerSettings

    model = write_segmenting_model(tmp_path / "model")
    loaded = []

    def load():
        pipeline = LisaPipeline.from_pretrained(model)
        loaded.append(weakref.ref(pipeline))
        return pipeline
    worker = InferenceWorker(load, lambda outcome: None, lambda event: None, WorkerSettings(),
                             lambda camera: "camera/image_raw", lambda text: None)
    worker.start()
    assert worker.loaded.wait(60) and worker.model_loaded
    assert worker.stop(5.0)
    gc.collect()
    assert loaded[0]() is None, gc.get_referrers(loaded[0]())


def test_diagnostics_report_state_and_counts(client):
    assert client.wait_for(lambda: client.statuses and client.statuses[-1]["lifecycle_state"] == "active", 5)
    status = client.statuses[-1]
    assert status["model_loaded"] and status["counts"]["inactive"] >= 2 and status["counts"]["ok"] >= 2
    assert status["counts"]["model_not_loaded"] >= 2 and status["level"] == 0, status


def _goal(text, **fields):
    from lisa_ros.action import Query

    return Query.Goal(query=text, **fields)


def test_action_streams_the_answer_before_the_result(client):
    feedback = []
    started = time.monotonic()
    handle = client.send_goal(_goal("Where is the red box?", max_new_tokens=6, query_id="streamed"), feedback)
    assert handle.accepted
    result = client.goal_result(handle)
    done = time.monotonic()
    assert result.status == Status.OK and result.query_id == "streamed", result.error
    with client.lock:
        texts = [message.text for _, message in feedback]
        stages = [message.stage for _, message in feedback]
        first_generating = next(t for t, message in feedback if message.stage == message.STAGE_GENERATING)
    assert stages[0] == 0 and sorted(set(stages)) == [0, 1, 2, 3]  # queued, encoding, generating, masks
    generating = [text for (_, m), text in zip(feedback, texts) if m.stage == m.STAGE_GENERATING]
    assert len(generating) == 6 and all(a == b[:len(a)] and len(a) < len(b) for a, b in zip(generating, generating[1:]))
    assert generating[-1] == result.answer
    print(f"first streamed token after {first_generating - started:.3f} s, whole answer {done - started:.3f} s")


def test_cancel_mid_answer_ends_within_a_decode_step(client):
    feedback = []
    handle = client.send_goal(_goal("Where is the red box?", max_new_tokens=LONG_ANSWER), feedback)

    def generating():
        with client.lock:
            return sum(1 for _, m in feedback if m.stage == m.STAGE_GENERATING)
    assert client.wait_for(lambda: generating() >= 3, 30)
    asked = time.monotonic()
    cancel = handle.cancel_goal_async()
    assert client.wait_for(cancel.done, 10)
    result = client.goal_result(handle, timeout_s=30)
    took = time.monotonic() - asked
    assert result.status == Status.CANCELLED and "cancelled" in result.error, result.error
    tokens = generating()
    assert tokens < LONG_ANSWER, "generation stopped early"
    print(f"cancelled after {tokens} tokens; {took * 1000:.0f} ms from the cancel request to the result")
    assert took < 5.0


def test_conversation_carries_its_turns_until_reset_or_expiry(client):
    from lisa_ros.srv import Segment

    def ask(text, conversation="kitchen"):
        return client.segment(Segment.Request(query=text, conversation_id=conversation))

    first = ask("Where is the red box?")
    assert first.status == Status.OK and first.history_turns == 0 and first.conversation_id == "kitchen"
    second = ask("And what is left of it?")
    assert second.history_turns == 1 and second.turns_dropped == 0
    assert ask("Something else", conversation="garage").history_turns == 0, "conversations are separate"
    assert client.reset_conversation("kitchen") == 1
    assert ask("Start again").history_turns == 0

    assert all(r.successful for r in set_parameters(client, conversation_max_turns=1))
    ask("One more")
    third = ask("And another")
    assert third.history_turns == 1 and third.turns_dropped == 1 and "max_turns" in third.notes, third.notes

    assert all(r.successful for r in set_parameters(client, conversation_idle_expiry=0.5))
    time.sleep(1.0)
    expired = ask("After a pause")
    assert expired.history_turns == 0 and "expired" in expired.notes, expired.notes
    assert all(r.successful for r in set_parameters(client, conversation_idle_expiry=300.0,
                                                    conversation_max_turns=8))

    assert all(r.successful for r in set_parameters(client, max_prompt_tokens=5))
    too_long = ask("a question longer than five tokens can hold")
    assert too_long.status == Status.BAD_QUERY and "max_prompt_tokens" in too_long.error, too_long.error
    assert all(r.successful for r in set_parameters(client, max_prompt_tokens=0))


def test_every_failure_kind_has_its_status_code_and_the_counts_match(client, ros):
    from lisa_ros.image_conv import cv2_to_imgmsg
    import numpy as np
    from std_msgs.msg import String

    from lisa_ros.srv import Segment

    with client.lock:
        seen = len(client.results)
    before = dict(client.statuses[-1]["counts"])
    client.query_pub.publish(String(data="   "))
    assert client.wait_for(lambda: any(r.query == "   " for r in client.results[seen:]), 10)
    assert next(r for r in client.results[seen:] if r.query == "   ").status == Status.BAD_QUERY
    bad_image = client.segment(Segment.Request(query="the box", use_image=True,
                                               image=cv2_to_imgmsg(np.zeros((1, 2000, 3), np.uint8), "rgb8")))
    assert bad_image.status == Status.BAD_IMAGE
    # Frames every 100 ms: an age limit of 1 ms is always exceeded.
    assert all(r.successful for r in set_parameters(client, max_image_age=0.001))
    assert client.query("Where is the red box?").status == Status.FRAME_TOO_OLD
    assert all(r.successful for r in set_parameters(client, max_image_age=10.0, service_timeout=0.1,
                                                    max_new_tokens=LONG_ANSWER))
    timed_out = client.segment(Segment.Request(query="Where is the red box?"))
    assert timed_out.status == Status.TIMEOUT and "service_timeout" in timed_out.error
    assert all(r.successful for r in set_parameters(client, service_timeout=120.0, max_new_tokens=2,
                                                    queue_size=1, overflow_policy="reject_new"))
    # The timed-out query is still being answered; with a queue of one, the second waits and the
    # third is refused.
    client.query_pub.publish(String(data="second"))
    full = client.query("third")
    assert full.status == Status.QUEUE_FULL and "queue full" in full.error
    assert all(r.successful for r in set_parameters(client, queue_size=4, overflow_policy="drop_oldest"))
    assert client.wait_for(lambda: any(r.query == "second" for r in client.results[seen:]), 60)
    time.sleep(0.5)  # the next diagnostics
    with client.lock:
        published = [r for r in client.results[seen:] if not r.tracked]
    after = client.statuses[-1]["counts"]
    for status in Status:
        assert after[status.label] - before[status.label] == sum(r.status == status for r in published), status
