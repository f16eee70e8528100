"""The node's health statistics on their own (no ROS): rate, latency percentiles, counts and the verdict."""

import threading

import numpy as np
import pytest

from lisa_ros.health import LEVELS, LatencyWindow, OutcomeCounts, RateMeter, assess
from lisa_ros.status import Status


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rate_over_the_window_then_falling_to_zero_when_ticks_stop():
    clock = FakeClock()
    meter = RateMeter(window_s=5.0, clock=clock)
    assert meter.rate() == 0.0
    for k in range(1, 41):  # 4 Hz for 10 s (quarter seconds are exact in binary)
        clock.now = k * 0.25
        meter.tick()
        if k == 4:
            assert meter.rate() == 4.0  # 4 ticks in the first second: since creation, not over 5 s
    assert meter.rate() == 4.0  # ticks in (5, 10]: 20 over 5 s
    clock.now = 12.5
    assert meter.rate() == 2.0  # ticks in (7.5, 10]: 10 over 5 s
    clock.now = 15.0
    assert meter.rate() == 0.0


def test_rate_window_must_be_positive():
    with pytest.raises(ValueError, match="window_s must be > 0, got 0"):
        RateMeter(window_s=0)


def test_percentiles_by_hand():
    window = LatencyWindow()
    assert window.percentile(50) is None
    for ms in range(1, 101):
        window.add(ms / 1000)
    assert window.percentile(50) == pytest.approx(0.0505)
    assert window.percentile(95) == pytest.approx(0.09505)
    assert window.percentile(0) == pytest.approx(0.001)
    assert window.percentile(100) == pytest.approx(0.100)


def test_percentiles_match_numpy_over_the_last_n_only():
    rng = np.random.default_rng(7)
    latencies = np.concatenate([rng.uniform(5.0, 9.0, 150), rng.exponential(0.2, 200)])
    window = LatencyWindow(size=200)
    for latency in latencies:
        window.add(float(latency))
    for q in (50, 95, 99.5):
        assert window.percentile(q) == pytest.approx(np.percentile(latencies[-200:], q), rel=1e-12)
        assert window.percentile(q) != pytest.approx(np.percentile(latencies, q), rel=1e-3)


@pytest.mark.parametrize("seconds", [-0.001, float("nan"), float("inf")])
def test_bad_latency_is_refused(seconds):
    with pytest.raises(ValueError, match="latency must be a finite number"):
        LatencyWindow().add(seconds)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_out_of_range_is_refused(q):
    with pytest.raises(ValueError, match="between 0 and 100"):
        LatencyWindow().percentile(q)


def test_window_size_must_be_positive():
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        LatencyWindow(size=0)


def test_counts_every_status_and_tracked():
    counts = OutcomeCounts()
    assert counts.snapshot() == {**{status.name.lower(): 0 for status in Status}, "tracked": 0}
    counts.add(Status.OK)
    counts.add(Status.OK, tracked=True)
    counts.add(Status.QUEUE_FULL)
    counts.add(Status(7))
    snapshot = counts.snapshot()
    assert (snapshot["ok"], snapshot["queue_full"], snapshot["model_error"], snapshot["tracked"]) == (2, 1, 1, 1)
    assert sum(snapshot.values()) == 5


def test_counts_refuse_an_unknown_status():
    with pytest.raises(ValueError, match="99 is not a valid Status"):
        OutcomeCounts().add(99)


def test_counts_are_exact_under_concurrent_adds():
    counts = OutcomeCounts()
    threads = [threading.Thread(target=lambda: [counts.add(Status.OK, tracked=True) for _ in range(5000)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts.snapshot()["ok"] == counts.snapshot()["tracked"] == 20_000


def healthy(**changes):
    counts = OutcomeCounts()
    for status in (Status.OK, Status.OK, Status.OK, Status.QUEUE_FULL, Status.QUEUE_FULL, Status.MODEL_ERROR,
                   Status.FRAME_TOO_OLD):
        counts.add(status)
    counts.add(Status.OK, tracked=True)
    arguments = dict(model_state="loaded", model_error=None, seconds_since_frame=0.3, max_image_age=1.0,
                     queue_length=1, queue_size=4, fps_in=29.97, latency_p50=0.1234, latency_p95=0.5,
                     counts=counts.snapshot(), last_error="model error: RuntimeError: boom", active=True)
    arguments.update(changes)
    return assess(**arguments)


def test_levels_are_the_diagnostic_names():
    assert LEVELS == ("OK", "WARN", "ERROR")


def test_healthy_node_is_ok_with_every_value():
    report = healthy()
    assert (report.level, report.message) == ("OK", "ok")
    assert report.values == {
        "model_state": "loaded", "model_load_error": "", "active": "true", "seconds_since_frame": "0.3",
        "fps_in": "30.0", "queue": "1/4", "latency_p50_ms": "123.4", "latency_p95_ms": "500.0",
        "dropped": "2", "failed": "2",
        "ok": "4", "no_frame": "0", "frame_too_old": "1", "queue_full": "2", "bad_query": "0", "bad_image": "0",
        "model_not_loaded": "0", "model_error": "1", "timeout": "0", "cancelled": "0", "inactive": "0",
        "shutting_down": "0", "tracked": "1",
        "last_error": "model error: RuntimeError: boom",
    }


def test_model_failed_to_load_is_an_error_before_any_warning():
    report = healthy(model_state="failed", model_error="OSError: no config.json", active=False, queue_length=4)
    assert (report.level, report.message) == ("ERROR", "model failed to load: OSError: no config.json")
    assert report.values["model_load_error"] == "OSError: no config.json"


def test_loading_model_is_ok():
    assert healthy(model_state="loading").level == "OK"


def test_inactive_is_a_warning():
    report = healthy(active=False)
    assert (report.level, report.message) == ("WARN", "inactive")
    assert report.values["active"] == "false"


def test_no_frame_for_longer_than_max_image_age_is_a_warning():
    report = healthy(seconds_since_frame=3.2)
    assert (report.level, report.message) == ("WARN", "no frame for 3.2 s (max_image_age 1.0 s)")
    assert healthy(seconds_since_frame=1.0).level == "OK"


def test_no_frame_ever_is_a_warning():
    report = healthy(seconds_since_frame=None)
    assert (report.level, report.message) == ("WARN", "no frame received yet")
    assert report.values["seconds_since_frame"] == "never"


@pytest.mark.parametrize("seconds_since_frame", [None, 1e6])
def test_max_image_age_zero_never_warns_about_frames(seconds_since_frame):
    assert healthy(max_image_age=0.0, seconds_since_frame=seconds_since_frame).level == "OK"


def test_full_queue_is_a_warning():
    report = healthy(queue_length=4)
    assert (report.level, report.message) == ("WARN", "query queue full (4/4)")
    assert healthy(queue_length=3).level == "OK"


def test_no_latency_yet_reads_n_a():
    report = healthy(latency_p50=None, latency_p95=None)
    assert (report.values["latency_p50_ms"], report.values["latency_p95_ms"]) == ("n/a", "n/a")


def test_counts_without_every_status_are_refused():
    counts = OutcomeCounts().snapshot()
    del counts["timeout"], counts["tracked"]
    with pytest.raises(ValueError, match="counts lacks timeout, tracked"):
        healthy(counts=counts)
