"""bench/bench_camera.py and bench/bench_cameras.py run their real paths in a few seconds (--quick):
real node processes, a real camera process, DDS on this machine only. Their numbers must be sane;
speeds are not checked (they depend on the machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
BENCH_TIMEOUT_S = 240


def run_quick(script: str, folder: Path) -> tuple[dict, str]:
    """Runs `script --quick` in its own process; (its numbers, the section it appended)."""
    results, numbers = folder / "results.md", folder / "numbers.json"
    results.write_text("# results\n")
    completed = subprocess.run([sys.executable, str(BENCH_DIR / script), "--quick", "--out", str(results),
                                "--json", str(numbers)], capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    appended = results.read_text()
    assert appended.startswith("# results\n")  # appended, not rewritten
    return json.loads(numbers.read_text()), appended


@pytest.fixture(scope="module")
def camera_run(tmp_path_factory):
    return run_quick("bench_camera.py", tmp_path_factory.mktemp("bench_camera"))


@pytest.fixture(scope="module")
def cameras_run(tmp_path_factory):
    return run_quick("bench_cameras.py", tmp_path_factory.mktemp("bench_cameras"))


def test_camera_benchmark_counts_frames_answers_and_3d_points(camera_run):
    numbers, appended = camera_run
    assert [(row["run"]["reliable"], row["run"]["transports"], row["run"]["encoding"]) for row in numbers["rows"]] == [
        (False, "", "rgb8"), (True, "", "jpeg")]  # the second: jpeg on the compressed topic, the node set to it
    for row in numbers["rows"]:
        assert 0 < row["received"] <= row["sent"], row
        assert row["received_share"] == pytest.approx(row["received"] / row["sent"])
        # `auto` subscribed to image, depth and camera info as the camera publishes them.
        wanted = "reliable" if row["run"]["reliable"] else "best_effort"
        chosen = [part.split(": ")[1] for part in row["reliability"].split(", ")]
        assert chosen == [wanted] * 3, row["reliability"]
        assert row["answered"] == row["asked"] == numbers["queries"], row["statuses"]
        assert sum(row["statuses"].values()) == row["asked"]
        assert len(row["latency_node"]) == row["ok"] and len(row["latency_wall"]) == row["answered"]
        assert all(0 < node <= wall for node, wall in zip(row["latency_node"], row["latency_wall"]))
        assert row["targets"] >= row["ok"] and 0 <= row["points_3d"] <= row["targets"]
        assert row["node_cpu_s"] > 0 and row["window_s"] > 0.9 * numbers["seconds"]
        assert row["node_exit"] == 0
        assert 100 < row["node_rss_start_mb"] <= row["node_rss_peak_mb"] < 8000, row
        # The same camera to a bare rclpy subscriber: what the transport delivered.
        bare, = row["bare"]
        assert bare["depth"] == 10 and 0 < bare["received"] <= bare["sent"] and bare["cpu_s"] > 0, bare
        assert appended.count(f"| {row['label']} |") == 2  # a row in the frames table and in the queries table
    assert numbers["machine"] in appended


def test_cameras_benchmark_measures_one_node_and_three(cameras_run):
    numbers, appended = cameras_run
    setups = [(row["processes"], row["batch_size"]) for row in numbers["rows"]]
    assert setups == [(1, 8), (1, 1), (3, 8)]
    for row in numbers["rows"]:
        assert row["answered"] == row["asked"] == 3 * (numbers["rounds"] + numbers["bursts"]), row["statuses"]
        assert row["statuses"] == {"ok": row["asked"]}
        assert 0 < row["uss"] < row["rss"]
        assert len(row["single_node"]) == len(row["single_wall"]) == 3 * numbers["rounds"]
        assert len(row["burst_s"]) == len(row["burst_first_s"]) == numbers["bursts"]
        assert all(0 < first <= last for first, last in zip(row["burst_first_s"], row["burst_s"]))
        assert row["burst_queries_per_s"] == pytest.approx(3 * numbers["bursts"] / sum(row["burst_s"]))
        assert row["load_s"] > 0 and row["node_exits"] == [0] * row["processes"]
    one, three = numbers["rows"][0], numbers["rows"][2]
    # Three processes each hold a model and its libraries: more memory than one.
    assert three["rss"] > one["rss"]
    assert appended.count("| one node, 3 cameras |") == 2 and appended.count("| 3 nodes, 1 camera each |") == 1


def test_a_profile_row_sets_the_profile_in_its_process_only():
    sys.path.insert(0, str(BENCH_DIR))
    import bench_camera

    from lisa_ros.process import PROFILE_VARIABLES

    env = {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA", "ROS_DOMAIN_ID": "7"}
    base = bench_camera.transport_env(env, bench_camera.NODE_PROFILE)
    assert base == {"ROS_DOMAIN_ID": "7"}
    node = bench_camera.process_env(base, bench_camera.NODE_PROFILE, "node")
    assert all(node[name].endswith("fastdds_large_frames.xml") for name in PROFILE_VARIABLES)
    assert bench_camera.process_env(base, bench_camera.NODE_PROFILE, "camera") == base
    assert bench_camera.process_env(base, bench_camera.CAMERA_PROFILE, "camera") == node
    assert bench_camera.transport_env(env, "UDPv4")["FASTDDS_BUILTIN_TRANSPORTS"] == "UDPv4"
