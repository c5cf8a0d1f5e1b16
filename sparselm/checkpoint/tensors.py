"""A read-only mapping of canonical name -> tensor, read on demand: what checkpoint readers share."""
from __future__ import annotations

import torch


class CanonicalTensors:
    """Subclasses set ``shapes`` (stored name -> shape) and ``aliases`` (another name of a stored tensor, e.g. a
    tied output projection -> the stored name) and implement ``__getitem__`` (the whole tensor, read when
    asked); ``full`` is the same, the name ``materialize`` uses."""

    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]

    def stored(self, name: str) -> str:
        return name if name in self.shapes else self.aliases.get(name, name)

    def __contains__(self, name: str) -> bool:
        return self.stored(name) in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def keys(self):
        return self.shapes.keys()

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def full(self, name: str) -> torch.Tensor:
        return self[name]

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def items(self):
        """(name, whole tensor) pairs, each read when reached."""
        return ((name, self[name]) for name in self.shapes)
