"""Two processes (DDP over gloo on the CPU) train exactly like one process with twice the accumulation.

Both runs are real `python -m training.train` processes; the DDP run is started by torchrun with two
workers on 127.0.0.1. Dropout is off so both see the same computation; the data stream deals global
micro-batches 0, 1 to the single process in turn and to ranks 0, 1 side by side.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from training.launch import torchrun_command

REPO = Path(__file__).resolve().parents[1]

RUN = {
    "tiny_model": {"seed": 0, "corpus": ["synthetic"]},
    "datasets": [{"type": "synthetic", "split": "train", "size": 50}],
    "finetune": "lora",
    "lora_dropout": 0.0,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "batch_size": 1,
    "warmup_steps": 0,
    "max_steps": 3,
    "save_every": 3,
    "max_length": 400,
    "lr": 1e-3,
    # Where a GPU exists the comparison still runs over gloo on the CPU; without one `cpu` stays unset,
    # and the workers must form one DDP group all the same.
    "cpu": torch.cuda.is_available(),
}


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _write_config(tmp_path, name, **overrides):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**RUN, "output_dir": str(tmp_path / name), **overrides}))
    return path


@pytest.mark.timeout(600)
def test_two_processes_equal_one_process_with_double_accumulation(tmp_path):
    single = _write_config(tmp_path, "single", grad_accumulation=2)
    ddp = _write_config(tmp_path, "ddp", grad_accumulation=1)
    _run([sys.executable, "-m", "training.train", "--config", str(single)], tmp_path)
    launched = _run(torchrun_command(2, ["--config", str(ddp)]), tmp_path)
    assert "on 2 process(es)" in launched.stdout

    single_rows = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp_rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp_rows] == [1, 2, 3]
    for a, b in zip(single_rows, ddp_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)

    single_weights = load_file(str(tmp_path / "single" / "checkpoints" / "step_3" / "model.safetensors"))
    ddp_weights = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_3" / "model.safetensors"))
    changed = 0
    assert single_weights.keys() == ddp_weights.keys()
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
        if "lora_B" in name:
            changed += int(tensor.abs().max() > 1e-4)  # B starts at zero: training moved it
    assert changed > 0
    states = [json.loads((tmp_path / n / "checkpoints" / "step_3" / "trainer_state.json").read_text())
              for n in ("single", "ddp")]
    assert states[0] == states[1] == {"step": 3, "micro_batches": 6}
