"""Mixing several readers with fixed ratios into one reproducible, map-style dataset."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from lisa_core.errors import ConfigurationError
from training.data.sample import Sample, SampleSource

# The official 9:3:3:1 over dataset groups; a source's group is its entry "type" (see build_sources).
DEFAULT_RATIOS = {"semantic": 9.0, "refer": 3.0, "vqa": 3.0, "reason_seg": 1.0, "synthetic": 1.0}


class MixtureDataset(torch.utils.data.Dataset):
    """`length` items; item i draws a source with probability proportional to its ratio, then an
    image of that source uniformly, with numpy's generator seeded by (seed, epoch, i).

    Only the sources given take part: ratios of absent groups are simply left out. Call `set_epoch`
    to get a different draw each epoch, identically on every process.
    """

    def __init__(
        self,
        sources: Mapping[str, SampleSource],
        ratios: Mapping[str, float],
        length: int,
        seed: int = 0,
    ):
        if not sources:
            raise ConfigurationError("a mixture needs at least one data source")
        missing = [name for name in sources if name not in ratios]
        if missing:
            raise ConfigurationError(f"no mixing ratio for sources {missing}")
        weights = np.array([float(ratios[name]) for name in sources])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigurationError(f"mixing ratios must be >= 0 with a positive sum, got {dict(ratios)}")
        empty = [name for name, source in sources.items() if len(source) == 0]
        if empty:
            raise ConfigurationError(f"data sources without items: {empty}")
        if length < 1:
            raise ConfigurationError(f"mixture length must be at least 1, got {length}")
        self.names = list(sources)
        self.sources = [sources[name] for name in self.names]
        self.probabilities = weights / weights.sum()
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a mixture of {self.length}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        choice = int(rng.choice(len(self.sources), p=self.probabilities))
        source = self.sources[choice]
        return source.get(int(rng.integers(len(source))), rng)


def mixture_ratios(groups: Mapping[str, str], overrides: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """Ratio per source name: `overrides[name]` if given, else DEFAULT_RATIOS of the source's group.

    Several sources of one group (e.g. refcoco and refcoco+) share the group's ratio equally, as the
    official code draws a group first and then one of its datasets uniformly.
    """
    overrides = dict(overrides or {})
    per_group: dict[str, list[str]] = {}
    for name, group in groups.items():
        if name not in overrides:
            per_group.setdefault(group, []).append(name)
    ratios = dict(overrides)
    for group, names in per_group.items():
        if group not in DEFAULT_RATIOS:
            raise ConfigurationError(f"no default ratio for group {group!r}; give the source a 'ratio'")
        for name in names:
            ratios[name] = DEFAULT_RATIOS[group] / len(names)
    return {name: ratios[name] for name in groups}
