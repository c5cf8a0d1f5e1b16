"""Canonical tensors as boxes in safetensors files, written and read through torch.distributed.checkpoint.

Every rank hands ``save_boxes`` the boxes it holds of each canonical tensor (offsets into the canonical tensor
and the values there, ``sparselm.parallel.boxes``); DCP's planner drops boxes that several ranks hold alike
(data-parallel replicas), giving each to the rank with the least to write, and every rank writes its own
files in parallel.  The files are DCP's Hugging Face storage (``HuggingFaceStorageWriter/Reader``): plain
safetensors whose header carries each tensor's offsets as JSON, so nothing is ever unpickled.  A
safetensors file holds one tensor per name, so a rank spreads its boxes over files
``shard-<rank+1>-model-<k>-of-<n>.safetensors`` holding at most one box of a tensor and about 256 MiB each.

``ShardReader`` reads any box of any canonical tensor by overlap with the stored chunks (DCP's resharding), so
each rank reads only what it needs whatever layout wrote the files; a directory of consolidated full tensors
(``model-0000k-of-0000n.safetensors``, as ``tools/convert_checkpoint.py consolidate`` writes) reads the same way.
"""
from __future__ import annotations

import json
import math
import queue
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import _gen_file_name
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from sparselm.checkpoint.files import write_safetensors
from sparselm.checkpoint.integrity import Checksums, HashingFileSystem, write_bytes
from sparselm.checkpoint.tensors import CanonicalTensors
from sparselm.errors import CheckpointError

Boxes = dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]]
"""Canonical name -> (canonical shape, [(offsets, tensor of the box)])."""


class _BoxSavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, enable_plan_caching=False)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict, self.is_coordinator = state_dict, is_coordinator
        self._by_index = {(name, tuple(off)): t for name, (_, boxes) in state_dict.items() for off, t in boxes}

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, (shape, boxes) in self.state_dict.items():
            for offsets, tensor in boxes:
                if tensor.numel() == 0:
                    continue
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(tensor.shape))
                items.append(WriteItem(index=MetadataIndex(name, torch.Size(offsets)), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=chunk, size=torch.Size(shape),
                                                                   properties=TensorProperties.create_from_tensor(tensor))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return self._by_index[(index.fqn, tuple(index.offset))].detach().to("cpu").contiguous()


class _ShardWriter(HuggingFaceStorageWriter):
    """Every rank writes its own files.  A file holds at most one box of each tensor (safetensors keys are
    names) and about ``max_file_bytes``: safetensors serialises a whole file in memory (twice its size), so
    the file size bounds what a save holds beyond the rank's own pieces."""

    def __init__(self, path: str, max_file_bytes: int):
        super().__init__(path, save_distributed=True)
        self.max_file_bytes = max_file_bytes
        self.fs = HashingFileSystem()  # every file's checksum, from the bytes as they are written

    def write_data(self, plan, planner):
        if not plan.items:
            return super().write_data(plan, planner)
        files: list[dict] = []  # {"names", "items", "bytes"}
        for item in plan.items:
            size = item.tensor_storage_size() or 0
            target = next((f for f in files if item.index.fqn not in f["names"]
                           and f["bytes"] + size <= self.max_file_bytes), None)
            if target is None:
                target = {"names": set(), "items": [], "bytes": 0}
                files.append(target)
            target["names"].add(item.index.fqn)
            target["items"].append(item)
            target["bytes"] += size

        todo: queue.Queue = queue.Queue()
        shard = plan.storage_data["shard_index"]
        for k, f in enumerate(files, start=1):
            name = _gen_file_name(k, len(files), shard)
            todo.put((self.fs.concat_path(self.path, name), name, f["items"]))
        return self._write_data(planner, todo)


def save_boxes(boxes: Boxes, path: Path, process_group=None, max_file_bytes: int = 256 << 20):
    """Collective over ``process_group`` (default: the world): write every rank's boxes under ``path``, in files
    of about ``max_file_bytes`` at most.  Returns DCP's metadata of the whole checkpoint (every tensor's shape and
    chunks) and the checksum entries of the files this rank wrote (file name -> ``integrity.HashingStream.entry``),
    computed while writing them."""
    path.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(str(path), max_file_bytes)
    metadata = dcp.save(boxes, storage_writer=writer, planner=_BoxSavePlanner(), process_group=process_group)
    return metadata, writer.fs.written


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Fills the destination views of ``{name: [(offsets, view)]}`` in place; a box that the stored chunks do
    not cover completely is an error (a shard file is missing)."""

    def __init__(self, source: str):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.source = source

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, boxes in self.state_dict.items():
            stored = self.metadata.state_dict_metadata.get(name)
            if stored is None:
                raise CheckpointError(f"'{self.source}' holds no tensor '{name}'; the checkpoint is incomplete or "
                                      "of another model")
            chunks = [ChunkStorageMetadata(torch.Size(off), torch.Size(view.shape)) for off, view in boxes]
            reads = create_read_items_for_chunk_list(name, stored, chunks)
            covered = [0] * len(chunks)
            for r in reads:
                covered[r.dest_index.index] += math.prod(r.lengths)
            for (off, view), n in zip(boxes, covered):
                if n != view.numel():
                    raise CheckpointError(f"'{self.source}' covers only {n} of the {view.numel()} elements of '{name}' "
                                          f"at offsets {tuple(off)}: a shard file is missing; use an earlier checkpoint")
            items += reads
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn][index.index][1]


class _CachedReader(HuggingFaceStorageReader):
    """DCP's safetensors reader, reading the files' headers once for many loads.  With the checkpoint's
    ``sums``, every file's header (names, shapes, DCP's offsets) is verified before it is trusted, and every
    file a load reads from is verified whole before the read (once per process)."""

    def __init__(self, path: str, sums: Checksums | None = None):
        super().__init__(path)
        self.sums = sums

    def _rel(self, file) -> str:
        return str(Path(file).relative_to(self.sums.ckpt))

    def read_metadata(self):
        if not hasattr(self, "_metadata"):
            if self.sums is not None:
                for file in sorted(Path(self.path).glob("*.safetensors")):
                    self.sums.verify_header(self._rel(file))
            self._metadata = super().read_metadata()
        return self._metadata

    def read_data(self, plan, planner):
        if self.sums is not None:
            for file in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
                self.sums.verify(self._rel(file))
        return super().read_data(plan, planner)


class ShardReader(CanonicalTensors):
    """The canonical tensors stored under a directory, read box by box (only the bytes asked for).

    A read-only mapping as well: ``reader[name]`` is the whole canonical tensor, ``reader.shapes`` every
    tensor's shape, ``aliases`` other names of a stored tensor (a tied projection) -> the stored name.
    ``sums``: the checkpoint's checksums, verified as files are read (``_CachedReader``).
    Raises CheckpointError for a missing directory, unreadable or changed files or chunks that do not tile a tensor."""

    def __init__(self, path: Path, aliases: dict[str, str] | None = None, sums: Checksums | None = None):
        self.path, self.aliases = Path(path), aliases or {}
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory '{self.path}' is missing; the checkpoint is incomplete, use an earlier one")
        self._reader = _CachedReader(str(self.path), sums)
        try:
            meta = self._reader.read_metadata()
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own errors, OSError or ValueError on damaged files
            raise CheckpointError(f"the safetensors files under '{self.path}' cannot be read ({err}); the checkpoint is "
                                  "damaged, use an earlier one") from None
        self.shapes = {name: tuple(md.size) for name, md in meta.state_dict_metadata.items()}
        for name, md in meta.state_dict_metadata.items():
            volume = sum(math.prod(c.sizes) for c in md.chunks)
            if volume != math.prod(md.size):
                raise CheckpointError(f"the chunks of '{name}' under '{self.path}' hold {volume} elements for a tensor of "
                                      f"shape {tuple(md.size)}: a shard file is missing or damaged; use an earlier checkpoint")

    def read_into(self, wanted: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]) -> None:
        """Fill each view with the canonical box at its offsets: ``{name: [(offsets, view)]}``."""
        wanted = {self.stored(n): boxes for n, boxes in wanted.items() if boxes}
        if not wanted:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            try:
                dcp.load(wanted, storage_reader=self._reader, planner=_BoxLoadPlanner(str(self.path)), no_dist=True)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
                _reraise_checkpoint_error(err)
                raise CheckpointError(f"reading {sorted(wanted)[:3]} from '{self.path}' failed ({err}); the checkpoint "
                                      "is damaged, use an earlier one") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[self.stored(name)]
        out = torch.empty(shape, dtype=self.dtype(name))
        self.read_into({name: [((0,) * len(shape), out)]})
        return out

    def dtype(self, name: str) -> torch.dtype:
        return self._reader.read_metadata().state_dict_metadata[self.stored(name)].properties.dtype

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows [first, first + count) along dim 0."""
        shape = self.shapes[self.stored(name)]
        out = torch.empty((count, *shape[1:]), dtype=torch.float32)
        self.read_into({name: [((first,) + (0,) * (len(shape) - 1), out)]})
        return out


def _reraise_checkpoint_error(err: BaseException) -> None:
    """DCP wraps what a reader raised in a CheckpointException per rank: raise our own CheckpointError out of it."""
    for failure in getattr(err, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            raise CheckpointError(str(inner)) from None


def write_consolidated(names: list[str], nbytes: dict[str, int], get, out: Path, max_shard_bytes: int = 2 << 30) -> dict[str, dict]:
    """Whole canonical tensors into Hugging Face-style shards ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` under ``out``, one shard in memory at a time: ``get(name)`` reads a tensor
    when its shard is written, ``nbytes`` plans the shards beforehand.  ``ShardReader`` reads the result.
    Returns each written file's checksum entry by file name (``integrity.HashingStream.entry``)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    out.mkdir(parents=True, exist_ok=True)
    files, weight_map = {}, {}
    for k, shard in enumerate(shards, start=1):
        file = out / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        files[file.name] = write_safetensors({n: get(n).contiguous() for n in shard}, file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file.name))
    index = {"metadata": {"total_size": sum(nbytes[n] for n in names)}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = write_bytes(out / "model.safetensors.index.json",
                                                        json.dumps(index, indent=1).encode())
    return files
