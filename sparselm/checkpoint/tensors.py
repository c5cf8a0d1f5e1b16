"""The one lazy-tensor interface every reader implements: a read-only mapping name -> tensor, read on demand.

Implementations: a checkpoint's ``LazyTensors`` (format 1) and ``ShardReader`` (format 2), a Hugging Face
directory's ``SafetensorsDir`` and the renamed / merged / split views of conversion (``MappedTensors``, both
ways between the two namings).
"""
from __future__ import annotations

import math

import torch


class CanonicalTensors:
    """Subclasses set ``shapes`` (stored name -> shape) and ``aliases`` (another name of a stored tensor, e.g. a
    tied output projection -> the stored name) and implement ``__getitem__`` (the whole tensor, read when
    asked) and ``dtype`` (from the headers, nothing read); ``full`` is the same as ``[name]``, the name
    ``materialize`` uses.  A name not held raises KeyError (readers of damaged files raise their own errors)."""

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

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name``, without reading it."""
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        """Bytes of ``name`` as stored (shape x element size), without reading it."""
        return math.prod(self.shapes[self.stored(name)]) * self.dtype(name).itemsize

    def full(self, name: str) -> torch.Tensor:
        return self[name]

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def items(self):
        """(name, whole tensor) pairs, each read when reached."""
        return ((name, self[name]) for name in self.shapes)
