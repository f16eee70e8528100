"""The node's process memory through configure and cleanup, with a model big enough to see (a tiny
LISA whose language model is ~130 M parameters, ~0.5 GB in fp32; random weights).

    tools/with_env.sh python bench/bench_lifecycle_memory.py [--out bench/results_node.md]

Starts the real node with autostart off, drives configure / activate / deactivate / cleanup through
its lifecycle services (one answer while active, so that every weight has been read), and reads the node process's resident memory (psutil) after each settles.
Appends a dated section to the results file.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_action import node_with_client, record  # noqa: E402

SETTLE_S = 2.0


def write_large_model(path: Path) -> float:
    """A tiny LISA with a wider, deeper language model; returns its weights' size in MB."""
    import torch

    from lisa_core.checkpoint import save_pretrained
    from lisa_core.config import LisaConfig
    from lisa_core.model import LisaModel
    from lisa_core.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LisaConfig.tiny(vocab_size=len(tokenizer))
    language = config.language_model
    language.hidden_size, language.intermediate_size, language.num_hidden_layers = 1024, 4096, 8
    language.num_attention_heads = language.num_key_value_heads = 16
    language.bos_token_id, language.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    language.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LisaModel(config).eval()
    save_pretrained(model, tokenizer, path)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def run(work: Path) -> tuple[float, dict]:
    import psutil

    from lisa_ros.image_conv import cv2_to_imgmsg
    from lisa_ros.srv import Segment
    from node_support import scene

    model_mb = write_large_model(work / "model")
    parameters = {"model_path": str(work / "model"), "autostart": False, "cpu_threads": 1}
    figures = {}
    with node_with_client(work, parameters, "bench_memory", camera=False) as (node, client):
        def measure(label):
            time.sleep(SETTLE_S)
            figures[label] = psutil.Process(node.pid).memory_info().rss / 2**20

        client.wait_for(lambda: client.query_pub.get_subscription_count() > 0, 60)
        measure("unconfigured (start)")
        for cycle in (1, 2):
            for transition in ("configure", "activate", "deactivate", "cleanup"):
                if not client.change_state(transition, timeout_s=120):
                    raise RuntimeError(f"{transition} failed: {(work / 'node.log').read_text()}")
                if transition == "activate":  # one answer, so every weight has been read
                    answer = client.segment(Segment.Request(query="the box", use_image=True,
                                                            image=cv2_to_imgmsg(scene(0), "rgb8")), 120)
                    if answer.status != 0:
                        raise RuntimeError(f"the query failed: {answer.error}")
                    measure(f"active, after an answer ({cycle})")
                if transition in ("configure", "cleanup"):
                    measure(f"{'configured' if transition == 'configure' else 'cleaned up'} ({cycle})")
    return model_mb, figures


def report(model_mb: float, figures: dict) -> str:
    import torch

    load = open("/proc/loadavg").read().split()[0]
    rows = "\n".join(f"| {label} | {mb:.0f} |" for label, mb in figures.items())
    return (f"\n## {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: node memory through the lifecycle\n\n"
            f"Machine: {platform.machine()}, load average {load}; Python {platform.python_version()}, torch "
            f"{torch.__version__}. bench/bench_lifecycle_memory.py: a {model_mb:.0f} MB (fp32) model, the node's "
            f"resident memory {SETTLE_S:.0f} s after each transition.\n\n| state | RSS (MB) |\n|---|---|\n{rows}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_node.md"))
    parser.add_argument("--no-record", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        record(report(*run(Path(work))), arguments.out, arguments.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
