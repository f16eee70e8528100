"""Hardening: bad parameters at start-up and at run time, models that cannot be loaded, a checkpoint
whose pickle would run code. Real node processes (started together, each in its own namespace of one
ROS domain) and real SetParameters calls from another node.

What the node does, by design:
- a parameter value that is wrong by itself (unknown device, unsupported precision, out of range, wrong
  type) stops the start: exit code 2 and one line "[lisa_perception] cannot start: <reason>", no traceback;
- a model that cannot be loaded (missing or corrupt folder, refused pickle, a device this machine lacks)
  makes the configure transition fail: the node stays up, unconfigured, and says why on every channel
  it has: /diagnostics (`model_error`, level ERROR), the log ("model failed to load: ..."), and each
  query's outcome (status MODEL_NOT_LOADED, error "model not loaded: ...");
- at run time, configure-time parameters are refused while configured and fixed ones always.
"""

import os
import time

import pytest

from hardening_support import end_process, set_parameters, start_perception_node, wait_for_status
from lisa_ros.parameters import NODE_NAME
from lisa_ros.status import Status
from ros_support import ros_session

REFUSED_AT_START = {
    "unknown device": ({"device": "tpu"}, "device must be cpu, cuda or cuda:<index>; got 'tpu'"),
    "unsupported precision": ({"precision": "fp64"}, "precision must be one of fp32, bf16, fp16; got 'fp64'"),
    "queue size out of range": ({"queue_size": 0}, "queue_size"),
    "rate out of range": ({"track_rate_hz": 1000.0}, "track_rate_hz"),
    "wrong type": ({"max_image_age": "old"}, "max_image_age"),
}
MODEL_NOT_LOADED = ("missing folder", "corrupt folder", "pickle that runs code", "device without a GPU")
# Ten node processes import torch and transformers at once (over 10 s of CPU each, before parameters
# are read): on a small shared machine the last of them gets that far minutes later.
START_TIMEOUT_S = 240


class _CreatesFile:
    """Unpickling this would create a file: code hidden in a checkpoint (torch.load without
    weights_only runs it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_checkpoint(folder, marker):
    """A released-layout checkpoint (config.json, CLIP folder, .bin shards) with a code-running pickle
    in one shard."""
    import torch

    from lisa_core.checkpoint import from_pretrained, save_official_layout
    from lisa_core.tiny import save_tiny_checkpoint

    model, tokenizer = from_pretrained(save_tiny_checkpoint(folder / "ours"))
    official = save_official_layout(model, tokenizer, folder / "official", vision_tower_dir=folder / "clip",
                                    shard_size=300_000)
    shard = sorted(official.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["payload"] = _CreatesFile(str(marker))
    torch.save(state, shard)
    return official, shard


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("hardening_parameters")) as session:
        yield session


@pytest.fixture(scope="module")
def nodes(ros):
    """Every node of the module, started at once: {case: (process, log)}; 'good' has a working model."""
    import torch

    from lisa_core.tiny import save_tiny_checkpoint

    tmp = ros["tmp"]
    good_model = save_tiny_checkpoint(tmp / "good_model", answer="Sure, [SEG].")
    corrupt = tmp / "corrupt_model"
    corrupt.mkdir()
    (corrupt / "lisa_config.json").write_text('{"language_model": {"hidden_size": ')
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    marker = tmp / "pickle_ran.txt"
    pickled, shard = _pickle_checkpoint(tmp / "pickled", marker)
    assert not marker.exists()
    base = {"diagnostics_rate_hz": 2.0, "cpu_threads": 1, "depth_topic": ""}
    cases = {case: {**base, **values} for case, (values, _) in REFUSED_AT_START.items()}
    cases.update({
        "missing folder": {**base, "model_path": str(tmp / "no_such_model")},
        "corrupt folder": {**base, "model_path": str(corrupt)},
        "pickle that runs code": {**base, "model_path": str(pickled)},
        "good": {**base, "model_path": str(good_model), "max_image_age": 0.0},
    })
    if not torch.cuda.is_available():
        cases["device without a GPU"] = {**base, "model_path": str(good_model), "device": "cuda"}
    started = {case: start_perception_node(ros, parameters, namespace=_namespace(case))
               for case, parameters in cases.items()}
    yield dict(processes=started, marker=marker, shard=shard, corrupt=corrupt, missing=tmp / "no_such_model")
    for process, _ in started.values():
        end_process(process)


def _namespace(case):
    return "/" + case.replace(" ", "_")


def _client(ros, case):
    from lisa_ros.client import PerceptionClient

    return PerceptionClient(ros["context"], namespace=_namespace(case), name="parameters_user")


@pytest.mark.parametrize("case", list(REFUSED_AT_START))
def test_a_bad_parameter_stops_the_start_with_exit_2_and_one_clear_line(nodes, case):
    process, log = nodes["processes"][case]
    _, reason = REFUSED_AT_START[case]
    assert process.wait(START_TIMEOUT_S) == 2, log.read_text()
    text = log.read_text()
    lines = [line for line in text.splitlines() if "cannot start:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"[{NODE_NAME}] cannot start: ") and reason in lines[0], text
    assert "Traceback" not in text


@pytest.mark.parametrize("case", MODEL_NOT_LOADED)
def test_a_model_that_cannot_load_is_reported_and_every_query_says_why(ros, nodes, case):
    from diagnostic_msgs.msg import DiagnosticStatus

    if case not in nodes["processes"]:
        pytest.skip("this machine has a CUDA GPU: device cuda loads")
    expected = {
        "missing folder": f"{nodes['missing']}",
        "corrupt folder": "lisa_config.json: not readable JSON",
        "pickle that runs code": f"{nodes['shard'].name}: refused to load: the pickle holds more than plain tensors",
        "device without a GPU": "device 'cuda' requested but PyTorch sees no CUDA GPU",
    }[case]
    process, log = nodes["processes"][case]
    client = _client(ros, case)
    try:
        status = client.wait_for_node(timeout_s=START_TIMEOUT_S)
        assert not status["model_loaded"] and expected in status["model_error"], status
        assert status["lifecycle_state"] == "unconfigured" and status["level"] == ord(DiagnosticStatus.ERROR), status
        assert status["message"].startswith("model failed to load: ") and expected in status["message"]
        result = client.query("Where is the red box?")
        assert not result.success and result.status == Status.MODEL_NOT_LOADED
        assert result.error.startswith("model not loaded: ") and expected in result.error, result.error
        assert process.poll() is None, "the node stays up and keeps answering"
    finally:
        client.close()
    text = log.read_text()
    assert "model failed to load: " in text and expected in text and "Traceback" not in text, text
    assert not nodes["marker"].exists(), "the pickle's code ran"


def test_run_time_values_out_of_range_are_refused_with_the_reason(ros, nodes):
    from rcl_interfaces.srv import GetParameters

    from node_support import scene

    client = _client(ros, "good")
    try:
        assert client.wait_for_node(timeout_s=START_TIMEOUT_S)["model_loaded"]
        node = f"{_namespace('good')}/{NODE_NAME}"
        at_configure = "is read when the node is configured: it changes only while the node is unconfigured"
        refused = {
            "queue_size": (0, "queue_size"), "max_image_age": (-1.0, "max_image_age"),
            "min_confidence": (1.5, "min_confidence"), "track_rate_hz": (0.0, "track_rate_hz"),
            "overflow_policy": ("drop_all", "overflow_policy must be one of drop_oldest, reject_new; got 'drop_all'"),
            "device": ("cuda", f"device {at_configure}"), "model_path": ("/elsewhere", f"model_path {at_configure}"),
            "query_topic": ("elsewhere/query", "read-only"),
        }
        for name, (value, reason) in refused.items():
            (result,) = set_parameters(client, node, **{name: value})
            assert not result.successful and reason in result.reason, (name, result.reason)
        (wrong_type,) = set_parameters(client, node, queue_size="many")
        assert not wrong_type.successful and wrong_type.reason, "a string for an integer is refused"

        service = client.node.create_client(GetParameters, f"{node}/get_parameters")
        assert service.wait_for_service(timeout_sec=10)
        future = service.call_async(GetParameters.Request(names=["queue_size", "overflow_policy", "device"]))
        assert client.wait_for(future.done, 10)
        values = future.result().values
        assert (values[0].integer_value, values[1].string_value, values[2].string_value) == (4, "drop_oldest", "cpu")

        (accepted,) = set_parameters(client, node, queue_size=8)
        assert accepted.successful
        assert client.wait_for(lambda: client.image_pub.get_subscription_count() > 0, 10)
        for _ in range(3):
            client.publish_frame(scene(0), time.time_ns())
            time.sleep(0.05)
        result = client.query("Where is the red box?")
        assert result.success and result.answer == "Sure, [SEG].", result.error
        assert result.status == Status.OK
        assert wait_for_status(client, lambda s: s["queue"].endswith("/8"), 5) is not None
    finally:
        client.close()
