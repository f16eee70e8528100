"""training.demo: the shipped config's data, and the one command that trains, exports and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lisa_core.pipeline import LisaPipeline
from training.config import load_config
from training.data import SyntheticReasonSeg, build_mixture
from training.data.synthetic import ABSENT_ANSWER
from training.demo import EVALUATION_SETS

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "training" / "configs" / "demo.yaml"


def test_demo_config_trains_on_explained_answers():
    config = load_config(DEMO_CONFIG)
    assert config.finetune == "full" and config.tiny_model is not None
    assert config.tiny_model["config"]["clip_framing"] == "pad" and config.iou_weight > 0
    assert config.appearance_weight > 0  # SAM learns each pixel's shape and colour (training.losses)
    dataset = build_mixture(config.datasets, config.epoch_samples, config.seed)
    answers = [answer for index in range(20) for conversation in dataset[index].conversations
               for _, answer in conversation]
    for answer in answers:
        assert answer == ABSENT_ANSWER or answer.startswith("[SEG]"), answer
    explained = [a for a in answers if a != ABSENT_ANSWER]
    assert explained and all(a.split("[SEG]")[-1].startswith(". ") and len(a.split(". ", 1)[1]) > 10
                             for a in explained)


@pytest.mark.timeout(600)
def test_demo_command_trains_on_two_processes_exports_and_reports(tmp_path):
    out = tmp_path / "model"
    command = [
        sys.executable, "-m", "training.demo", "--out", str(out), "--processes", "2", "--eval-size", "3",
        "--set", f"output_dir={tmp_path / 'run'}", "--set", "max_steps=2", "--set", "save_every=2",
        "--set", "warmup_steps=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    report = json.loads((out / "results.json").read_text())
    assert set(report["splits"]) == set(EVALUATION_SETS)
    assert report["splits"]["test 16:9 held-out"]["generation"]["queries"] == 3
    assert report["splits"]["test"]["generation"]["well_formed"] is not None
    results = (out / "RESULTS.md").read_text()
    assert "| test 16:9 held-out | 16:9 | held_out | generation |" in results
    assert "2 process(es) x 1 thread(s)" in results
    assert "`python -m training.demo --set output_dir=" in results and "--processes" not in results  # 2: the default
    sample = SyntheticReasonSeg(split="test", size=1).eval_sample(0)
    result = LisaPipeline.from_pretrained(out).segment(sample.image, "Which shape would roll?", max_new_tokens=8)
    assert result.union_mask.shape == sample.image.shape[:2]
