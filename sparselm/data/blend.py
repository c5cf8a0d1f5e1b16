"""Weighted mixtures of indexed datasets (``data.dataset`` / ``data.valid_dataset`` given as a blend).

A blend is Megatron's string ``"0.3 PREFIX_A 0.7 PREFIX_B"`` or a YAML list of ``{prefix, weight, name}``;
a single prefix (or ``default``) is a blend of one.  Sample i of the training stream comes from the source
that megatron-core's ``build_blending_indices`` (the helper behind Megatron's ``BlendedDataset``) picks:
the one furthest behind its weight, so after every sample each source's share is within one sample of
its weight.  Within a source, samples are drawn in a permutation seeded by ``train.seed`` and the
source's position, one epoch by default.  The stream depends only on the seed and the blend, never on
the layout; its state is the number of samples consumed, so a resumed run draws the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparselm.errors import ConfigError, DataExhausted


@dataclass(frozen=True)
class Source:
    name: str
    """Short name used in metrics (``data/<name>_samples``, ``val_loss/<name>``)."""
    prefix: str
    """Indexed dataset prefix (PATH without .bin/.idx), or 'default'."""
    weight: float
    """Share of the training samples, normalised over the blend."""


def parse_blend(spec, key: str = "data.dataset") -> list[Source]:
    """Sources of a blend spec; raises ConfigError naming ``key`` and the source for a malformed one."""
    if isinstance(spec, str):
        fields = spec.split()
        if len(fields) <= 1:
            return [Source(_name(spec), spec, 1.0)] if spec else []
        if len(fields) % 2:
            raise ConfigError(f"{key}='{spec}' has {len(fields)} fields; a blend is 'WEIGHT PREFIX WEIGHT PREFIX ...'")
        items = [{"weight": w, "prefix": p} for w, p in zip(fields[::2], fields[1::2])]
    elif isinstance(spec, list):
        items = spec
    else:
        raise ConfigError(f"{key} must be a prefix, a blend string or a list of {{prefix, weight, name}}")
    sources = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("prefix"):
            raise ConfigError(f"{key} source {i} ({item!r}) has no prefix; give {{prefix: PATH, weight: W, name: N}}")
        try:
            weight = float(item.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = float("nan")
        if not weight > 0 or weight == float("inf"):
            raise ConfigError(f"{key} source '{item['prefix']}' has weight {item.get('weight')!r}; weights must be "
                              "positive numbers")
        sources.append(Source(str(item.get("name") or _name(item["prefix"])), str(item["prefix"]), weight))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names sources {names}; give each a distinct name (the 'name' field)")
    total = sum(s.weight for s in sources)
    return [Source(s.name, s.prefix, s.weight / total) for s in sources]


def is_blend(spec) -> bool:
    """Whether a data.dataset / data.valid_dataset value names a mixture rather than one prefix."""
    return isinstance(spec, list) or len(str(spec).split()) > 1


def _name(prefix: str) -> str:
    return Path(prefix).name or prefix


def blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each of the first ``size`` samples, its position within that source), by megatron-core's
    compiled ``build_blending_indices``."""
    from megatron.core.datasets import helpers_cpp

    source = np.zeros(size, dtype=np.int16)
    position = np.zeros(size, dtype=np.int64)
    if size:
        helpers_cpp.build_blending_indices(source, position, np.asarray(weights, dtype=np.float64), len(weights),
                                           size, False)
    return source, position


class BlendedSamples:
    """The training stream of a blend as one dataset: item i is sample i of the stream (already mixed and
    shuffled, so the sampler reads it in order).  ``size``: samples the run needs (train.steps x global
    batch).  Raises DataExhausted naming the first source that runs out, unless ``allow_repeat``."""

    def __init__(self, sources: list[Source], samples: list, size: int, seed: int, allow_repeat: bool):
        self.sources, self.samples, self.seed = sources, samples, seed
        self.source, self.position = blending_indices([s.weight for s in sources], size)
        self.seq_len = samples[0].seq_len
        drawn = np.bincount(self.source, minlength=len(sources))
        for s, (src, data) in enumerate(zip(sources, samples)):
            if len(data) == 0:
                raise DataExhausted(f"blend source '{src.name}' ({src.prefix}) holds no complete sample of "
                                    f"{self.seq_len} tokens; use more data or a shorter data.seq_len")
            if drawn[s] > len(data) and not allow_repeat:
                first_short = int(np.searchsorted(np.cumsum(self.source == s), len(data) + 1))
                raise DataExhausted(
                    f"blend source '{src.name}' ({src.prefix}) holds {len(data)} samples but its weight "
                    f"{src.weight:.3g} draws {int(drawn[s])} over the run; it runs out at sample {first_short} of "
                    f"the stream; add data to it, lower its weight or train.steps, or set data.allow_repeat=true")
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.source)

    def _row(self, i: int) -> tuple[int, int]:
        s, pos = int(self.source[i]), int(self.position[i])
        n = len(self.samples[s])
        epoch, within = divmod(pos, n)
        key = (s, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != s}  # one epoch per source at a time
            self._perms[key] = np.random.default_rng([self.seed, s, epoch]).permutation(n)
        return s, int(self._perms[key][within])

    def batch(self, indices) -> np.ndarray:
        rows = [self._row(int(i)) for i in indices]
        if not rows:
            return np.zeros((0, self.seq_len + 1), np.int64)
        return np.stack([self.samples[s][r] for s, r in rows])

    def consumed_by_source(self, consumed: int) -> dict[str, int]:
        """Samples drawn from each source in the first ``consumed`` samples of the stream."""
        counts = np.bincount(self.source[:consumed], minlength=len(self.sources))
        return {src.name: int(c) for src, c in zip(self.sources, counts)}
