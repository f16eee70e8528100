"""launch/perception.launch.py: what it starts, checked without `launch` installed, then started for real.

`launch`/`launch_ros` are not installable here, so the file keeps the node description in a plain
function; this test reads it, checks generate_launch_description passes that description to
launch_ros's Node, and runs the installed executable with the described parameters the way launch_ros
does (a params file per dictionary), then asks the running node for its parameters over ROS and
watches it report the model loaded and the node active on /diagnostics.
"""

import ast
import importlib.util
import os
import time
from pathlib import Path

import yaml

from ros_support import ros_env, wait_until  # noqa: F401  (ros_env is a fixture)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "perception.launch.py"
CONFIG_FILE = ROOT / "config" / "perception.yaml"


def _load_launch_module():
    spec = importlib.util.spec_from_file_location("perception_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_arguments_are_documented_and_cover_the_brief():
    launch = _load_launch_module()
    names = [name for name, _, _ in launch.LAUNCH_ARGUMENTS]
    assert set(names) == {"autostart", "model_path", "device", "precision", "image_topic", "depth_topic",
                          "camera_info_topic", "namespace", "params_file"}
    for name, _, description in launch.LAUNCH_ARGUMENTS:
        assert len(description) > 10, f"launch argument {name} has no real description"
        assert name in launch.__doc__, f"launch argument {name} missing from the file's usage text"


def test_generate_launch_description_passes_the_plain_description_to_node():
    tree = ast.parse(LAUNCH_FILE.read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description")
    calls = {n.func.id: n for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    node_call = calls["Node"]
    assert not node_call.args and len(node_call.keywords) == 1 and node_call.keywords[0].arg is None
    inner = node_call.keywords[0].value
    assert isinstance(inner, ast.Call) and inner.func.id == "node_description"
    # Every launch argument is declared, from the same table.
    declare = calls["DeclareLaunchArgument"]
    comprehension = next(n for n in ast.walk(function) if isinstance(n, ast.ListComp) and n.elt is declare)
    assert ast.unparse(comprehension.generators[0].iter) == "LAUNCH_ARGUMENTS"
    # `launch` is imported only inside the function, so the file imports without it.
    top_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all("launch" not in ast.unparse(n).split() for n in top_imports)


def test_config_file_holds_the_declared_defaults():
    from lisa_ros.parameters import PARAMETERS

    text = CONFIG_FILE.read_text()
    values = yaml.safe_load(text)["/**"]["ros__parameters"]
    # A params file cannot hold an empty list (no element gives it a type): those are shown commented out.
    listed = [spec for spec in PARAMETERS if spec.default != []]
    commented = [spec.name for spec in PARAMETERS if spec.default == []]
    assert set(values) == {spec.name for spec in listed}
    for spec in listed:
        assert values[spec.name] == spec.default and type(values[spec.name]) is type(spec.default), spec.name
    for name in commented:
        assert f"# {name}: [" in text, f"{name} is neither set nor shown in {CONFIG_FILE.name}"


def test_described_node_is_the_installed_executable_and_runs_with_the_launch_parameters(ros_env):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from lisa_core.tiny import save_tiny_checkpoint
    from lisa_ros.client import status_from_diagnostic
    from lisa_ros.parameters import EXECUTABLE, NODE_NAME, PACKAGE
    from lisa_ros.process import installed_executable, node_command, start_node

    launch = _load_launch_module()
    model_dir = save_tiny_checkpoint(ros_env.tmp_path / "tiny")
    arguments = {"autostart": True, "model_path": str(model_dir), "device": "cpu", "precision": "fp32",
                 "image_topic": "front/rgb", "depth_topic": "", "camera_info_topic": "front/info",
                 "namespace": "launch_check", "params_file": launch.default_params_file(ROOT)}
    description = launch.node_description(arguments)
    assert (description["package"], description["executable"], description["name"]) == (PACKAGE, EXECUTABLE,
                                                                                         NODE_NAME)
    executable = installed_executable()
    assert executable.parts[-3:] == ("lib", PACKAGE, EXECUTABLE) and os.access(executable, os.X_OK)
    params_file, overrides = description["parameters"]
    assert params_file == str(CONFIG_FILE)
    assert overrides == {name: arguments[name] for name in launch.PARAMETER_ARGUMENTS}

    command = node_command(description["parameters"], ros_env.tmp_path, namespace=description["namespace"],
                           name=description["name"], executable=executable)
    node_process = start_node(command, ros_env.child_env, ros_env.tmp_path / "node.log")
    try:
        with ros_env.context() as context:
            probe = rclpy.create_node("launch_probe", context=context)
            statuses = []
            node_path = f"launch_check/{NODE_NAME}"

            def on_diagnostics(array):
                statuses.extend(status_from_diagnostic(s) for s in array.status if s.name.lstrip("/") ==
                                f"{node_path}: camera")
            probe.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics,
                                      QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            client = probe.create_client(GetParameters, f"/{node_path}/get_parameters")
            # image_reliability auto subscribes once a camera publishes: a camera, and one on the default
            # depth topic, which the node must leave alone (depth_topic is empty).
            probe.create_publisher(Image, "/launch_check/front/rgb", 1)
            probe.create_publisher(Image, "/launch_check/camera/depth/image_raw", 1)
            assert client.wait_for_service(timeout_sec=30), (node_process.poll(), _log(ros_env))
            future = client.call_async(GetParameters.Request(names=list(overrides) + ["queue_size"]))
            executor = rclpy.executors.SingleThreadedExecutor(context=context)
            executor.add_node(probe)
            executor.spin_until_future_complete(future, timeout_sec=10)
            values = [parameter_value_to_python(v) for v in future.result().values[:len(overrides)]]
            assert dict(zip(overrides, values)) == overrides
            assert future.result().values[-1].integer_value == 4, "params_file defaults apply"
            def active():
                return next((s for s in statuses if s["model_loaded"] and s["lifecycle_state"] == "active"), None)
            assert wait_until(lambda: probe.count_subscribers("/launch_check/front/rgb") == 1 and active(), 60,
                              spin=lambda t: executor.spin_once(timeout_sec=t)), (statuses[-1:], _log(ros_env))
            assert active()["model_path"] == str(model_dir) and active()["image_topic"] == "/launch_check/front/rgb"
            assert not wait_until(lambda: probe.count_subscribers("/launch_check/camera/depth/image_raw") > 0, 1.0,
                                  spin=lambda t: executor.spin_once(timeout_sec=t)), "empty depth_topic: none"
    finally:
        exit_code = stop_process_and_time(node_process)
    assert exit_code == 0, _log(ros_env)
    assert "Traceback" not in _log(ros_env)


def stop_process_and_time(process) -> int:
    import signal

    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    process.wait(10)
    assert time.monotonic() - started < 2.0, "SIGINT must end the node within 2 s"
    return process.returncode


def _log(ros_env) -> str:
    return (ros_env.tmp_path / "node.log").read_text(errors="replace")
