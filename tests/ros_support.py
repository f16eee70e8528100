"""Helpers for tests that run real rclpy and DDS, in this process and in child processes.

Every test gets its own ROS domain (reserved with a lock file, so test runs going on side by side on
this machine never share one), discovery limited to this machine, and ROS logs under its tmp_path.

    from ros_support import ros_env  # the fixture

    def test_something(ros_env):
        with ros_env.context() as context:          # rclpy in this process, on the test's domain
            node = rclpy.create_node("probe", context=context)
            child = start_python(CHILD_CODE, ros_env.child_env)
            ...
            stop_process(child)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

TESTS_DIR = Path(__file__).resolve().parent

# Fast DDS derives its ports from the domain id; 1..232 keeps them valid. 0 is left to people's own
# ROS sessions.
DOMAIN_IDS = range(1, 233)
_DOMAIN_LOCK_DIR = Path(tempfile.gettempdir()) / "lisa_ros_test_domains"


@contextlib.contextmanager
def reserved_domain_id() -> Iterator[int]:
    """A ROS domain id no other process using this function holds, reserved until the block ends."""
    _DOMAIN_LOCK_DIR.mkdir(exist_ok=True)
    start = os.getpid() % len(DOMAIN_IDS)
    for offset in range(len(DOMAIN_IDS)):
        domain_id = DOMAIN_IDS[(start + offset) % len(DOMAIN_IDS)]
        lock_file = open(_DOMAIN_LOCK_DIR / f"{domain_id}.lock", "w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            continue
        try:
            yield domain_id
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()
        return
    raise RuntimeError(f"all ROS domain ids {DOMAIN_IDS.start}..{DOMAIN_IDS.stop - 1} are in use by tests")


def child_env(domain_id: int, log_dir: Path) -> dict[str, str]:
    """Environment for a child process: this one's (venv, install/), on the given domain, local only."""
    env = dict(os.environ)
    env.update(
        ROS_DOMAIN_ID=str(domain_id),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_LOG_DIR=str(log_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class RosTestEnv:
    domain_id: int
    log_dir: Path
    child_env: dict[str, str]
    tmp_path: Path

    @contextlib.contextmanager
    def context(self):
        """An rclpy context in this process on the test's domain, shut down when the block ends."""
        import rclpy
        from rclpy.context import Context

        context = Context()
        rclpy.init(context=context, domain_id=self.domain_id)
        try:
            yield context
        finally:
            context.try_shutdown()


@pytest.fixture
def ros_env(tmp_path, monkeypatch) -> Iterator[RosTestEnv]:
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    monkeypatch.setenv("ROS_LOG_DIR", str(log_dir))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with reserved_domain_id() as domain_id:
        monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))
        yield RosTestEnv(domain_id, log_dir, child_env(domain_id, log_dir), tmp_path)


@dataclass
class ChildProcess:
    """A Python child process started by a test; its output goes to a file, read by `output()`."""

    process: subprocess.Popen
    output_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")


def start_python(code: str, env: dict[str, str], output_path: Path, args: tuple[str, ...] = ()) -> ChildProcess:
    """Runs `python -c code args...` in the repository root, stdout and stderr into output_path."""
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=TESTS_DIR.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return ChildProcess(process, output_path)


def stop_process(child: ChildProcess, timeout_s: float = 10.0) -> int:
    """Asks the child (by its pid) to stop with SIGINT, kills it after timeout_s; its exit code."""
    if child.process.poll() is None:
        os.kill(child.pid, signal.SIGINT)
        try:
            child.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.process.wait()
    return child.process.returncode


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.02,
               spin: Optional[Callable[[float], None]] = None) -> bool:
    """Polls condition until it holds or timeout_s passes; `spin(poll_s)` (e.g. an executor's
    spin_once) runs between polls, else it sleeps. Whether the condition came true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        if spin is None:
            time.sleep(poll_s)
        else:
            spin(poll_s)


def wait_for_subscribers(publisher, count: int = 1, timeout_s: float = 20.0) -> None:
    """Waits until `count` subscriptions have matched the publisher: messages sent before discovery
    finishes can be lost."""
    if not wait_until(lambda: publisher.get_subscription_count() >= count, timeout_s):
        raise TimeoutError(f"{publisher.topic_name}: {publisher.get_subscription_count()} of {count} "
                           f"subscriptions matched after {timeout_s} s")


def wait_for_publishers(node, topic: str, count: int = 1, timeout_s: float = 20.0) -> None:
    """Waits until `count` publishers on `topic` are known to the node."""
    if not wait_until(lambda: node.count_publishers(topic) >= count, timeout_s):
        raise TimeoutError(f"{topic}: {node.count_publishers(topic)} of {count} publishers "
                           f"discovered after {timeout_s} s")


@contextlib.contextmanager
def ros_session(tmp: Path) -> Iterator[dict]:
    """A ROS domain of its own, an environment for child processes, and rclpy in this process on it."""
    import rclpy
    from rclpy.context import Context

    log_dir = tmp / "ros_log"
    log_dir.mkdir()
    with pytest.MonkeyPatch.context() as patch, reserved_domain_id() as domain_id:
        patch.setenv("ROS_LOG_DIR", str(log_dir))
        patch.setenv("ROS_DOMAIN_ID", str(domain_id))
        context = Context()
        rclpy.init(context=context, domain_id=domain_id)
        try:
            yield dict(tmp=tmp, env=child_env(domain_id, log_dir), context=context)
        finally:
            context.try_shutdown()
