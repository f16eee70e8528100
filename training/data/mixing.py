"""Mixing several readers with fixed ratios into one reproducible, map-style dataset."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

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

    `windows` (a curriculum) limits a source to the stream positions [start, end) (end None: open), the
    position of item i in epoch e being e * length + i; elsewhere the other sources share its draws in
    their ratios. Every position must have a source.
    """

    def __init__(
        self,
        sources: Mapping[str, SampleSource],
        ratios: Mapping[str, float],
        length: int,
        seed: int = 0,
        windows: Optional[Mapping[str, Sequence[Optional[int]]]] = None,
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
        self.weights = weights
        self.probabilities = weights / weights.sum()
        self.windows = _checked_windows(self.names, weights, windows or {})
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
        choice = int(rng.choice(len(self.sources), p=self.probabilities_at(self.epoch * self.length + index)))
        source = self.sources[choice]
        return source.get(int(rng.integers(len(source))), rng)

    def probabilities_at(self, position: int) -> np.ndarray:
        """Each source's share of the draw at stream `position`."""
        if not self.windows:
            return self.probabilities
        weights = self.weights * [_inside(self.windows.get(name), position) for name in self.names]
        return weights / weights.sum()


def _inside(window: Optional[tuple[int, Optional[int]]], position: int) -> bool:
    return window is None or (window[0] <= position and (window[1] is None or position < window[1]))


def _checked_windows(names: list[str], weights: np.ndarray, windows: Mapping[str, Sequence[Optional[int]]]) -> dict:
    unknown = sorted(set(windows) - set(names))
    if unknown:
        raise ConfigurationError(f"windows name sources that do not exist: {unknown}")
    checked = {}
    for name, window in windows.items():
        if len(window) != 2 or window[0] is None or window[0] < 0 or (window[1] is not None and window[1] <= window[0]):
            raise ConfigurationError(f"the window of source {name!r} must be [start, end) with 0 <= start < end "
                                     f"(end null: open), got {list(window)}")
        checked[name] = (int(window[0]), None if window[1] is None else int(window[1]))
    # Which sources draw changes only at a window's ends: a position without any is one of them (or 0).
    edges = {0, *(end for window in checked.values() for end in window if end is not None)}
    for position in sorted(edges):
        if not any(weight > 0 and _inside(checked.get(name), position) for name, weight in zip(names, weights)):
            raise ConfigurationError(f"no source draws at stream position {position}: the windows {checked} leave a gap")
    return checked


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
