"""The lisa-segment command on the tiny model, in-process and as a real subprocess."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from lisa_core.cli import main
from lisa_core.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=2, answer="Sure, [SEG].")


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8))
    return path


def test_cli_writes_mask_overlay_and_json(checkpoint, photo, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(photo), "Can you segment the cup?", "--model", str(checkpoint), "--output", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "loading" in captured.err and "answer:" in captured.out
    record = json.loads((out / "photo_result.json").read_text())
    assert record["query"] == "Can you segment the cup?" and record["image_size"] == [30, 44]
    assert record["answer"] == "Sure, [SEG]." and len(record["targets"]) == 1
    assert set(record["timings"]) >= {"clip", "sam_encoder", "prefill", "decode", "mask_decoder", "postprocess"}
    mask = cv2.imread(str(out / "photo_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (30, 44) and set(np.unique(mask)) <= {0, 255}
    assert (mask > 0).sum() == record["targets"][0]["area"] > 0
    overlay = cv2.imread(str(out / "photo_overlay.png"))
    original = cv2.imread(str(photo))
    assert overlay.shape == (30, 44, 3)
    assert not np.array_equal(overlay[mask > 0], original[mask > 0])  # the target is tinted


def test_cli_reports_errors_without_a_traceback(checkpoint, tmp_path, capsys):
    assert main([str(tmp_path / "missing.png"), "cup", "--model", str(checkpoint)]) == 2
    assert "image file not found" in capsys.readouterr().err
    image = tmp_path / "ok.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    assert main([str(image), "cup", "--model", str(tmp_path / "nomodel")]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_cli_as_a_process(checkpoint, photo, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-m", "lisa_core.cli", str(photo), "Where is the cup?", "--model", str(checkpoint),
         "--output", str(tmp_path / "o"), "--max-new-tokens", "3"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "o" / "photo_result.json").exists()
