"""Which model folder the node loads, and how to describe it to people.

An empty `model_path` means the embedded demo model: the trained one shipped in models/demo/ when it
is there, else the untrained tiny preset, written once into a cache folder. The tiny preset has
random weights: its answers and masks only show that the machinery runs, and everything that
reports on it says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

UNTRAINED_TINY_LABEL = "untrained tiny preset (random weights: answers and masks are meaningless)"
TRAINED_DEMO_LABEL = "trained demo model (models/demo)"
TINY_PRESET_SEED = 0
MODEL_CONFIG_FILES = ("lisa_config.json", "config.json")  # our format, the official layout


@dataclass(frozen=True)
class ModelSource:
    path: Path
    label: str  # what logs and status call it
    needs_writing: bool = False  # the tiny preset, not yet in the cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lisa_ros"


def demo_model_dirs() -> list[Path]:
    """Where the trained demo model may be: the source tree, then the installed share folder."""
    package_dir = Path(__file__).resolve().parent
    candidates = [package_dir.parent / "models" / "demo"]
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        return candidates
    try:
        candidates.append(Path(get_package_share_directory("lisa_ros")) / "models" / "demo")
    except (PackageNotFoundError, OSError):  # not installed, or no ROS environment at all
        pass
    return candidates


def is_model_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in MODEL_CONFIG_FILES)


def resolve_model(model_path: str, cache_dir: Union[str, Path, None] = None) -> ModelSource:
    if model_path:
        path = Path(model_path).expanduser()
        return ModelSource(path, f"model at {path}")
    for candidate in demo_model_dirs():
        if is_model_dir(candidate):
            return ModelSource(candidate, TRAINED_DEMO_LABEL)
    tiny = Path(cache_dir or default_cache_dir()) / f"tiny-untrained-seed{TINY_PRESET_SEED}-{_tiny_code_version()}"
    return ModelSource(tiny, UNTRAINED_TINY_LABEL, needs_writing=not is_model_dir(tiny))


def _tiny_code_version() -> str:
    """A digest of the code that writes the tiny preset, so a cached copy from other code is not used."""
    import lisa_core.config
    import lisa_core.tiny

    digest = hashlib.sha256()
    for module in (lisa_core.tiny, lisa_core.config):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def write_tiny_preset(path: Path) -> None:
    """Writes the untrained tiny preset to `path` atomically (processes starting together may race)."""
    from lisa_core.tiny import save_tiny_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    save_tiny_checkpoint(staging / "model", seed=TINY_PRESET_SEED)
    try:
        os.rename(staging / "model", path)
    except OSError:
        if not is_model_dir(path):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
