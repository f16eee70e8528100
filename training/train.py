"""Fine-tune LISA with `accelerate`: one CPU process, several GPUs (DDP), several machines, DeepSpeed.

Run:
    python -m training.train --config training/configs/reason_seg_7b.yaml [--set key=value ...]

Engines (the command is the same; the launcher decides how many processes run it):
- one process (CPU or one GPU):  `python -m training.train --config ...`
- several GPUs on one machine (DDP): `accelerate launch --multi_gpu --num_processes 8 -m training.train --config ...`
  (or `torchrun --nproc_per_node 8 -m training.train ...`)
- several machines: the same on every machine with `--num_machines N --machine_rank R
  --main_process_ip HOST --main_process_port PORT` (accelerate launch) or torchrun's `--nnodes/--node_rank/
  --master_addr`.
- DeepSpeed ZeRO-2 (the official engine): `--set deepspeed_zero_stage=2` (needs `pip install deepspeed`;
  micro-batch, accumulation, clipping and bf16 are taken from this config), or `--set deepspeed_config=ds.json`
  for a complete DeepSpeed JSON. Launch with `accelerate launch` or `deepspeed` as above.
`batch_size` is per process and per micro-batch; one optimizer step sees
batch_size x grad_accumulation x processes samples. 1 process with accumulation 2k equals 2 processes
with accumulation k (tests/test_train_ddp.py checks it).

Data order: the mixture (training.data.build_mixture) is read as an endless stream, position p being
item p % epoch_samples of epoch p // epoch_samples. Global micro-batch g holds positions
[g*batch_size, (g+1)*batch_size) and goes to process g % processes, so the stream is the same for any
number of processes. Checkpoints record the optimizer step and the number of micro-batches consumed,
and `resume: latest` continues exactly where the run stopped (same data, same random state).

Outputs in `output_dir`: config.yaml (the resolved config), metrics.jsonl (one line per `log_every`
optimizer steps: step, lr, loss and its ce/bce/dice terms averaged over the step's micro-batches and
processes, samples/s, elapsed seconds), loss_curve.png, checkpoints/step_N (accelerate state plus
trainer_state.json), and with `export_dir` set a merged model folder lisa_core loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, Dataset, Sampler

from lisa_core.errors import ConfigurationError
from training.build import build_model, checkpoint_dirs
from training.collate import LisaCollator
from training.config import TrainConfig, add_config_arguments, load_config
from training.data import build_mixture
from training.data.mixing import MixtureDataset
from training.data.synthetic import APPEARANCE_CLASSES
from training.export import export_model
from training.losses import LossWeights
from training.model import LisaForTraining, count_parameters, enable_gradient_checkpointing, prepare_for_finetuning

LOSS_KEYS = ("loss", "ce", "bce", "dice", "iou", "appearance")


# ---- data ----------------------------------------------------------------------------------------


class SampleStream(Dataset):
    """Position p of the endless stream: item p % len(mixture) of epoch p // len(mixture)."""

    def __init__(self, mixture: MixtureDataset) -> None:
        self.mixture = mixture

    def __len__(self) -> int:  # DataLoader asks; the stream itself has no end
        return len(self.mixture)

    def __getitem__(self, position: int):
        epoch, index = divmod(position, len(self.mixture))
        self.mixture.set_epoch(epoch)
        return self.mixture[index]


class ProcessBatchSampler(Sampler):
    """Global micro-batches start_batch, start_batch+1, ... of `batch_size` positions; this process
    takes those with g % num_processes == process_index."""

    def __init__(self, batch_size: int, process_index: int, num_processes: int, start_batch: int = 0) -> None:
        self.batch_size = batch_size
        self.process_index = process_index
        self.num_processes = num_processes
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch + (self.process_index - self.start_batch) % self.num_processes
        while True:
            yield list(range(batch * self.batch_size, (batch + 1) * self.batch_size))
            batch += self.num_processes


# ---- optimisation --------------------------------------------------------------------------------


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR factor: 0 -> 1 linearly over `warmup_steps`, then linearly to 0 at `total_steps`
    (DeepSpeed's WarmupDecayLR with warmup_type "linear", as the official code configures it)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def deepspeed_config(config: TrainConfig) -> Optional[dict]:
    """The DeepSpeed config for `deepspeed_zero_stage` / `deepspeed_config`, or None for plain DDP."""
    if config.deepspeed_config is not None:
        return json.loads(Path(config.deepspeed_config).read_text())
    if config.deepspeed_zero_stage is None:
        return None
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accumulation,
        "gradient_clipping": config.grad_clip,
        "zero_allow_untested_optimizer": True,  # our torch AdamW (same settings as DeepSpeed's)
        "zero_optimization": {
            "stage": config.deepspeed_zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "bf16": {"enabled": config.mixed_precision == "bf16"},
        "fp16": {"enabled": config.mixed_precision == "fp16"},
    }


def make_accelerator(config: TrainConfig) -> Accelerator:
    plugin = None
    ds_config = deepspeed_config(config)
    if ds_config is not None:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accumulation,
        # accelerate joins a torchrun group on CPUs only when told to use the CPU; without a GPU it would
        # otherwise run every worker as an independent single process, all writing the same output_dir.
        cpu=config.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1),
        deepspeed_plugin=plugin,
        # Batches whose answers hold no [SEG] leave SAM's decoder unused on that process.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


@dataclass
class TrainerState:
    """What a checkpoint needs beyond model/optimizer/scheduler/RNG: where the run is."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # global micro-batches consumed

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.micro_batches = int(state["micro_batches"])


# ---- outputs -------------------------------------------------------------------------------------


def resolve_resume(config: TrainConfig) -> Optional[Path]:
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = checkpoint_dirs(Path(config.output_dir))
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigurationError(f"resume: {path} is not a checkpoint folder (no trainer_state.json)")
    return path


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss curves (total and terms) against the optimizer step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = np.array([row["step"] for row in rows])
    window = max(1, len(rows) // 50)  # moving average over ~2% of the run; raw values drawn faintly
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in LOSS_KEYS:
        values = np.array([row.get(key, 0.0) for row in rows])
        if not values.any():  # a term with weight 0 (log scale)
            continue
        line, = axis.plot(steps, values, alpha=0.15, linewidth=0.5)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1:], smooth, color=line.get_color(), label=key, linewidth=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"loss (weighted terms), {window}-step average")
    axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


# ---- the loop ------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a TrainConfig; `run()` trains to `max_steps` and returns the final losses."""

    def __init__(self, config: TrainConfig, dataset: Optional[MixtureDataset] = None) -> None:
        """`dataset` replaces the mixture built from `config.datasets` (a map-style dataset of Samples
        with `set_epoch`, e.g. a MixtureDataset of custom sources)."""
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.accelerator = make_accelerator(config)
        set_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        model, self.tokenizer = build_model(config)
        prepare_for_finetuning(model, config)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model
        weights = LossWeights(
            config.ce_weight, config.bce_weight, config.dice_weight, config.iou_weight, config.appearance_weight
        )
        appearance_classes = APPEARANCE_CLASSES if config.appearance_weight else ()
        self.module = LisaForTraining(model.train(), self.tokenizer, weights, appearance_classes)
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(config.warmup_steps, config.max_steps)
        )
        # The scheduler is stepped here once per optimizer step (not prepared: accelerate would step a
        # prepared one once per process), and checkpointed with the trainer state.
        self.wrapped, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        self.state = TrainerState()
        self.accelerator.register_for_checkpointing(self.scheduler, self.state)
        self.collator = LisaCollator(self.tokenizer, model.config, config.max_length, len(appearance_classes))
        if dataset is None:
            if not config.datasets:
                raise ConfigurationError("no training data: add entries to `datasets` (see training.data)")
            dataset = build_mixture(config.datasets, config.epoch_samples, config.seed)
        self.stream = SampleStream(dataset)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def _loader(self) -> Iterator:
        sampler = ProcessBatchSampler(
            self.config.batch_size,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            start_batch=self.state.micro_batches,
        )
        loader = DataLoader(
            self.stream,
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
            # Its own generator: creating the iterator must not draw from the global RNG, or a resumed
            # run would see different dropout than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        return iter(loader)

    def save_checkpoint(self) -> Path:
        folder = self.output_dir / "checkpoints" / f"step_{self.state.step}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            (folder / "trainer_state.json").write_text(json.dumps(self.state.state_dict()) + "\n")
            for old in checkpoint_dirs(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))
        self.log(f"resumed from {folder} at step {self.state.step}")

    def _micro_step(self, batches: Iterator, totals: dict[str, torch.Tensor]) -> None:
        batch = next(batches).to(self.accelerator.device)
        with self.accelerator.accumulate(self.wrapped):
            losses = self.wrapped(batch)
            self.accelerator.backward(losses["loss"])
            if self.accelerator.sync_gradients and self.config.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for key in LOSS_KEYS:
            totals[key] += losses[key].detach().float()
        self.state.micro_batches += self.accelerator.num_processes

    def run(self) -> dict[str, float]:
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resume_from = resolve_resume(config)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        metrics_path = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process:
            config.save(self.output_dir / "config.yaml")
            if resume_from is None:
                metrics_path.write_text("")
        self.log(
            f"training {count_parameters(self.model, trainable_only=True):,} of "
            f"{count_parameters(self.model):,} parameters ({config.finetune}) on "
            f"{self.accelerator.num_processes} process(es), device {self.accelerator.device}"
        )
        from tqdm.auto import tqdm

        progress = tqdm(
            total=config.max_steps, initial=self.state.step, disable=not self.accelerator.is_main_process,
            desc="train", dynamic_ncols=True,
        )
        batches = self._loader()
        started = time.time()
        last: dict[str, float] = {}
        device = self.accelerator.device
        while self.state.step < config.max_steps:
            step_started = time.time()
            totals = {key: torch.zeros((), device=device) for key in LOSS_KEYS}
            for _ in range(config.grad_accumulation):
                self._micro_step(batches, totals)
            self.scheduler.step()
            self.state.step += 1
            progress.update(1)
            if self.state.step % config.log_every == 0 or self.state.step == config.max_steps:
                averaged = self.accelerator.reduce(torch.stack([totals[k] for k in LOSS_KEYS]), reduction="mean")
                last = {key: float(value) / config.grad_accumulation for key, value in zip(LOSS_KEYS, averaged)}
                samples = config.batch_size * config.grad_accumulation * self.accelerator.num_processes
                row = {
                    "step": self.state.step,
                    "lr": self.scheduler.get_last_lr()[0],
                    **last,
                    "samples_per_s": samples / max(time.time() - step_started, 1e-9),
                    "elapsed_s": time.time() - started,
                }
                progress.set_postfix(loss=f"{last['loss']:.4f}")
                if self.accelerator.is_main_process:
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
            if self.state.step % config.save_every == 0 or self.state.step == config.max_steps:
                self.save_checkpoint()
                if self.accelerator.is_main_process:
                    plot_metrics(metrics_path, self.output_dir / "loss_curve.png")
        progress.close()
        if config.export_dir is not None:
            self.export(Path(config.export_dir))
        self.accelerator.wait_for_everyone()
        return last

    def export(self, directory: Path) -> Path:
        """Merge LoRA (if any) into the trained model, in place, and save it in lisa_core's format."""
        if self.accelerator.is_main_process:
            export_model(self.accelerator.unwrap_model(self.wrapped).model, self.tokenizer, directory)
            self.log(f"exported the merged model to {directory}")
        self.accelerator.wait_for_everyone()
        return directory


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    Trainer(load_config(args.config, args.overrides)).run()


if __name__ == "__main__":
    main()
