"""A plain (copying) colcon install, used from outside the repository, runs the trained demo model.

tools/build_interfaces.sh --copy builds the package into a temporary build and install folder, with
this repository's own install/ and source tree out of every search path. The installed node then
starts with an empty model_path in a folder outside the repository and must load the demo model
installed under share/lisa_ros/models/demo, as a robot's release install would (its log line, and its
/diagnostics entry naming that model).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ros_support import TESTS_DIR, ros_env, wait_until  # noqa: F401  (ros_env is a fixture)

ROOT = TESTS_DIR.parent
PATH_VARIABLES = ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "COLCON_PREFIX_PATH", "PYTHONPATH",
                  "LD_LIBRARY_PATH", "PATH")
# Where the installed Python code and data are, as the install itself answers.
PROBE = """
import json
import lisa_core, lisa_ros.demo, lisa_ros.node, training.build
from lisa_ros.model_source import resolve_model
from lisa_ros.process import installed_executable
print(json.dumps({
    "executable": str(installed_executable()),
    "modules": [m.__file__ for m in (lisa_core, lisa_ros.demo, lisa_ros.node, training.build)],
    "scenes": str(lisa_ros.demo.scenes_dir()),
    "model": str(resolve_model("").path),
}))
"""


def without_repository(env: dict) -> dict:
    """`env` with this repository's install/, source tree and tests/ taken out of the search paths
    (its .venv, which holds Python and the ROS wheels, stays)."""
    install = ROOT / "install"
    cleaned = dict(env)
    for name in PATH_VARIABLES:
        entries = [entry for entry in env.get(name, "").split(os.pathsep) if entry
                   and Path(entry) not in (ROOT, TESTS_DIR) and install not in (Path(entry), *Path(entry).parents)]
        if entries:
            cleaned[name] = os.pathsep.join(entries)
        else:
            cleaned.pop(name, None)
    return cleaned


def in_install(install: Path, command: list) -> list:
    """`command` run after sourcing the install's local_setup.bash (that workspace only, no underlay)."""
    return ["bash", "-c", 'source "$0" && exec "$@"', str(install / "local_setup.bash"), *map(str, command)]


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    base = tmp_path_factory.mktemp("plain_install")
    env = without_repository(dict(os.environ))
    completed = subprocess.run(
        [str(ROOT / "tools" / "build_interfaces.sh"), "--copy", str(base / "build"), str(base / "install")],
        env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return base / "install", env


def test_plain_install_holds_copies_not_links(plain_install):
    install, _ = plain_install
    share = install / "lisa_ros" / "share" / "lisa_ros"
    for path in (share / "models" / "demo" / "model.safetensors", share / "models" / "demo" / "scenes" / "scenes.json",
                 install / "lisa_ros" / "lib" / "lisa_ros" / "perception_node"):
        assert path.is_file() and not path.is_symlink(), path
    assert not any(p.is_symlink() for p in install.rglob("*.py")), "a copying install holds no linked modules"


def test_installed_node_runs_the_trained_demo_model_from_outside_the_repository(plain_install, ros_env):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from lisa_ros.client import status_from_diagnostic
    from lisa_ros.model_source import TRAINED_DEMO_LABEL
    from lisa_ros.parameters import NODE_NAME
    from lisa_ros.process import node_command

    install, _ = plain_install
    env = without_repository(ros_env.child_env)
    workdir = ros_env.tmp_path / "elsewhere"
    workdir.mkdir()
    share = install / "lisa_ros" / "share" / "lisa_ros"

    probe = subprocess.run(in_install(install, [sys.executable, "-c", PROBE]), env=env, cwd=workdir,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert all(install in Path(path).parents for path in found["modules"]), found["modules"]
    assert Path(found["executable"]) == install / "lisa_ros" / "lib" / "lisa_ros" / "perception_node"
    assert Path(found["scenes"]) == share / "models" / "demo" / "scenes"
    assert Path(found["model"]) == share / "models" / "demo"

    log_path = ros_env.tmp_path / "node.log"
    command = node_command([{"model_path": "", "device": "cpu", "cpu_threads": 1}], workdir,
                           executable=found["executable"])
    with open(log_path, "wb") as log:
        node = subprocess.Popen(in_install(install, command), env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    model_line = f"model: {TRAINED_DEMO_LABEL}; loading from {share / 'models' / 'demo'}"
    try:
        assert wait_until(lambda: model_line in log_path.read_text(errors="replace") or node.poll() is not None,
                          60), log_path.read_text(errors="replace")
        assert model_line in log_path.read_text(errors="replace"), log_path.read_text(errors="replace")
        with ros_env.context() as context:
            listener = rclpy.create_node("install_probe", context=context)
            statuses = []

            def on_diagnostics(array):
                statuses.extend(status_from_diagnostic(s) for s in array.status
                                if s.name.lstrip("/") == f"{NODE_NAME}: camera")
            listener.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics,
                                         QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            executor = rclpy.executors.SingleThreadedExecutor(context=context)
            executor.add_node(listener)
            spin = lambda timeout: executor.spin_once(timeout_sec=timeout)  # noqa: E731
            assert wait_until(lambda: any(s["model_loaded"] for s in statuses), 120, spin=spin), (
                statuses[-1:], log_path.read_text(errors="replace"))
            loaded = next(s for s in statuses if s["model_loaded"])
            assert loaded["model"] == TRAINED_DEMO_LABEL and loaded["model_error"] is None
            assert Path(loaded["model_path"]) == share / "models" / "demo"
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    log = log_path.read_text(errors="replace")
    assert node.returncode == 0, log
    assert "Traceback" not in log and "model failed to load" not in log, log
