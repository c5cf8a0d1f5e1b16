"""Checksums that prove a checkpoint's integrity: computed while each file is written, verified on every read.

Every file of a checkpoint gets an xxh3-64 digest (``xxhash``, the reference implementation's Python binding:
several GB/s per core, incremental) from the bytes as the writing rank hands them to the file system, so
nothing written is read back.  safetensors files also get a digest of their header (the 8-byte length and the
JSON that holds DCP's offsets of each box), which every reading rank checks before trusting any offset.
``meta.json``, written last, records them all (``checksums``) and ends with a digest of its own text, so a
changed byte anywhere is named on the next read.

Readers call ``Checksums(ckpt, meta)``: ``verify(rel)`` hashes a whole file (once per process),
``verify_header(rel)`` its header, ``read(rel)`` reads and verifies a small file in one pass; each raises
CheckpointError naming the file, the digest written and the one found, and the newest earlier checkpoint that
verifies.  Checkpoints written before checksums (no ``checksums`` in meta.json) load with a one-line notice.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem

from sparselm.errors import CheckpointError

ALGORITHM = "xxh3_64"
SEAL_KEY = "meta_xxh3_64"
_CHUNK = 8 << 20
_OVERLAP = 1 << 20  # writes at least this large are hashed on a second thread while the first writes them
_SEAL = re.compile(r',\n "' + SEAL_KEY + r'": "([0-9a-f]*)"\n}\s*$')
HASH_THREADS = min(8, len(os.sched_getaffinity(0)))
"""Threads that hash a checkpoint's files on one rank (``checkpoint_problems``)."""
_verified: set[tuple] = set()  # (path, size, mtime_ns, digest) this process hashed and found as written
_noticed: set[str] = set()


def forget_verified() -> None:
    """Forget which files this process already verified, so the next read hashes them again (benchmarks)."""
    _verified.clear()


def digest(data) -> str:
    """The xxh3-64 digest of ``data`` (bytes-like) as 16 hex digits."""
    return xxhash.xxh3_64(data).hexdigest()


class HashingStream:
    """A binary stream that hashes what is written through it on the way to ``raw`` (no second read).
    ``safetensors``: also hash the header (8-byte little-endian length + that many bytes of JSON)."""

    def __init__(self, raw, safetensors: bool = False):
        self.raw, self.size = raw, 0
        self._hash = xxhash.xxh3_64()
        self._head = xxhash.xxh3_64() if safetensors else None
        self._head_end: int | None = None
        self._prefix = b""

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._head is not None:
            self._hash_header(view)
        self.size += len(view)
        if len(view) < _OVERLAP:
            self._hash.update(view)
            return self.raw.write(data)
        # xxhash and the file write both release the GIL: the hash costs no time beside a write of this size
        hashing = threading.Thread(target=self._hash.update, args=(view,), name="sparselm-hash")
        hashing.start()
        try:
            return self.raw.write(data)
        finally:
            hashing.join()

    def _hash_header(self, view: memoryview) -> None:
        """Called before ``size`` counts ``view``."""
        if self._head_end is None:
            self._prefix += bytes(view[:8 - len(self._prefix)])
            if len(self._prefix) == 8:
                self._head_end = 8 + int.from_bytes(self._prefix, "little")
        end = self._head_end if self._head_end is not None else 8
        if self.size < end:
            self._head.update(view[:end - self.size])

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()

    def entry(self) -> dict:
        """What meta.json records of the file: ``bytes``, ``digest`` and, for safetensors, ``header``."""
        out = {"bytes": self.size, "digest": self._hash.hexdigest()}
        if self._head is not None:
            out["header"] = self._head.hexdigest()
        return out


def write_bytes(path: Path, data: bytes) -> dict:
    """Write ``data`` to ``path``, hashing it on the way; returns its entry (``HashingStream.entry``)."""
    with open(path, "wb") as f:
        stream = HashingStream(f)
        stream.write(data)
    return stream.entry()


def copy_file(src: Path, dst: Path) -> dict:
    """Copy ``src`` to ``dst`` (like shutil.copyfile), hashing the bytes as they are written; returns the entry."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        stream = HashingStream(fout)
        shutil.copyfileobj(fin, stream, _CHUNK)
    return stream.entry()


class HashingFileSystem(FileSystem):
    """DCP's local file system whose write streams hash what DCP writes (``_write_files_from_queue`` writes
    each safetensors file through ``create_stream(path, "wb")``); ``written`` maps each file's name to its
    entry once the stream is closed."""

    def __init__(self):
        super().__init__()
        self.written: dict[str, dict] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = HashingStream(stream, safetensors=str(path).endswith(".safetensors"))
            yield hashing
        self.written[Path(path).name] = hashing.entry()


def manifest(entries: dict[str, dict]) -> dict:
    """meta.json's ``checksums`` from every file's entry (relative path -> ``HashingStream.entry``)."""
    return {"algorithm": ALGORITHM, "files": {k: e["digest"] for k, e in sorted(entries.items())},
            "headers": {k: e["header"] for k, e in sorted(entries.items()) if "header" in e}}


def seal(meta: dict) -> str:
    """meta.json's text: the JSON of ``meta`` ending with the digest of the text before it."""
    body = json.dumps(meta, indent=1)
    return body[:-2] + f',\n "{SEAL_KEY}": "{digest(body.encode())}"\n}}\n'


def unseal(path: Path, text: str) -> dict:
    """Parse meta.json's ``text`` and check its own digest.  A meta.json without one is accepted only when it
    records no checksums either (written before them).  Raises CheckpointError naming the file and the newest
    earlier checkpoint that verifies."""
    try:
        return _unseal(path, text)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_earlier(path.parent)}") from None


def _unseal(path: Path, text: str) -> dict:
    found = _SEAL.search(text)
    body = text[:found.start()] + "\n}" if found else text
    try:
        meta = json.loads(body)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{path}' is unreadable ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{path}' holds no JSON object; the checkpoint is damaged")
    if found is None:
        if "checksums" in meta:
            raise CheckpointError(f"'{path}' has lost the checksum of its own text (it records file checksums, so it "
                                  "was sealed when written): it was changed or damaged")
        return meta
    now = digest(body.encode())
    if now != found.group(1):
        raise CheckpointError(mismatch(path, found.group(1), now))
    return meta


def mismatch(path: Path, expected: str, found: str, what: str = "") -> str:
    return (f"checkpoint file '{path}' fails its checksum{what}: {ALGORITHM} {expected} when written, {found} now "
            "(its bytes changed: bit rot, a partial write or an interrupted copy)")


def file_digest(path: Path) -> str:
    """xxh3-64 of a whole file, hashed straight from its pages (``mmap``: no copy into a buffer, half the CPU time
    of reading it in chunks on this project's CPU machine; the page cache then serves the read that follows)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as pages:
            pages.madvise(mmap.MADV_SEQUENTIAL)
            return xxhash.xxh3_64(pages).hexdigest()


def header_digest(path: Path) -> str:
    """xxh3-64 of a safetensors file's header (its 8-byte length and the JSON that follows)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        h = xxhash.xxh3_64(prefix)
        while n > 0 and (chunk := f.read(min(n, _CHUNK))):
            h.update(chunk)
            n -= len(chunk)
    return h.hexdigest()


def _is_rank0() -> bool:
    """Rank 0 of the world, or of the launch before the process group exists (start-up checks); a plain process."""
    return dist.get_rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"


class Checksums:
    """The checksums meta.json recorded for checkpoint ``ckpt``; ``recorded`` is False for a checkpoint written
    before them (then every check passes, after a one-line notice on rank 0)."""

    def __init__(self, ckpt: Path, meta: dict, notice: bool = True):
        self.ckpt = Path(ckpt)
        found = meta.get("checksums") or {}
        self.recorded = found.get("algorithm") == ALGORITHM
        self.files: dict[str, str] = found.get("files", {}) if self.recorded else {}
        self.headers: dict[str, str] = found.get("headers", {}) if self.recorded else {}
        if not self.recorded and notice and str(self.ckpt) not in _noticed and _is_rank0():
            _noticed.add(str(self.ckpt))
            print(f"sparselm: note: '{self.ckpt}' was written without checksums (before sparselm recorded them), so "
                  "its files cannot be verified", flush=True)

    def problem(self, rel: str) -> str | None:
        """Why file ``rel`` does not verify (one line), or None when it does (or nothing was recorded)."""
        expected = self.files.get(rel)
        if expected is None:
            return None
        path = self.ckpt / rel
        try:
            st = path.stat()
        except OSError:
            return f"checkpoint file '{path}' is missing; the checkpoint is incomplete"
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)
        if key in _verified:
            return None
        found = file_digest(path)
        if found != expected:
            return mismatch(path, expected, found)
        _verified.add(key)
        return None

    def verify(self, rel: str) -> None:
        """Hash file ``rel`` whole; raise CheckpointError when it differs from what was written."""
        text = self.problem(rel)
        if text is not None:
            raise CheckpointError(text + _earlier(self.ckpt))

    def verify_header(self, rel: str) -> None:
        """Hash only the header of safetensors file ``rel`` (its tensor names, shapes and DCP offsets)."""
        expected = self.headers.get(rel)
        if expected is None:
            return
        found = header_digest(self.ckpt / rel)
        if found != expected:
            raise CheckpointError(mismatch(self.ckpt / rel, expected, found, " (in its header)") + _earlier(self.ckpt))

    def read(self, rel: str) -> bytes:
        """The bytes of file ``rel``, verified in the same pass."""
        data = (self.ckpt / rel).read_bytes()
        expected = self.files.get(rel)
        if expected is not None and digest(data) != expected:
            raise CheckpointError(mismatch(self.ckpt / rel, expected, digest(data)) + _earlier(self.ckpt))
        return data


def read_manifest(ckpt: Path) -> dict:
    """meta.json of ``ckpt`` with its own checksum verified (nothing else); raises CheckpointError."""
    try:
        return _unseal(ckpt / "meta.json", (ckpt / "meta.json").read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{ckpt / 'meta.json'}' is unreadable ({err})") from None


def file_problem(ckpt: Path, rel: str, size: int | None, expected: str | None) -> str | None:
    """Why file ``rel`` of ``ckpt`` does not verify (missing, another size than ``size``, or an xxh3-64 other than
    ``expected``), or None.  A top-level function of plain arguments, so process pools can run it."""
    path = Path(ckpt) / rel
    if not path.is_file():
        return f"checkpoint file '{path}' is missing"
    if size is not None and path.stat().st_size != size:
        return f"checkpoint file '{path}' has {path.stat().st_size} bytes, {size} when written"
    if expected is None:
        return None
    return Checksums(Path(ckpt), {"checksums": {"algorithm": ALGORITHM, "files": {rel: expected}}}).problem(rel)


def checkpoint_problems(ckpt: Path, files: list[str] | None = None) -> list[str]:
    """Every reason checkpoint ``ckpt`` does not verify (one line each): meta.json, then each listed file (default:
    all) missing, of another size than written, or failing its checksum.  Empty when it verifies."""
    try:
        meta = read_manifest(ckpt)
    except CheckpointError as err:
        return [str(err)]
    sizes, sums = meta.get("files", {}), Checksums(ckpt, meta, notice=False)
    names = files if files is not None else sorted(sizes)
    # reads and xxhash release the GIL: files are hashed on several threads
    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(names)))) as pool:
        found = pool.map(lambda rel: file_problem(ckpt, rel, sizes.get(rel), sums.files.get(rel)), names)
        return [p for p in found if p is not None]


def step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def earlier_checkpoints(ckpt: Path) -> list[Path]:
    """The complete checkpoints of the same run older than ``ckpt`` (a ``step_<N>`` directory), newest first."""
    step = step_of(ckpt)
    if step is None:
        return []
    found = [p for p in ckpt.parent.glob("step_*") if (s := step_of(p)) is not None and s < step
             and (p / "meta.json").is_file()]
    return sorted(found, key=step_of, reverse=True)


def newest_verifying(ckpt: Path) -> Path | None:
    """The newest checkpoint of the same run older than ``ckpt`` whose every file verifies (hashed here)."""
    return next((p for p in earlier_checkpoints(ckpt) if not checkpoint_problems(p)), None)


def _earlier(ckpt: Path) -> str:
    """The end of a damage message: the newest earlier checkpoint that verifies, and how to resume from it."""
    good = newest_verifying(Path(ckpt))
    return earlier_line(good)


def earlier_line(good: Path | None) -> str:
    if good is None:
        return "; no earlier checkpoint of this run verifies"
    return f"; the newest earlier checkpoint that verifies is {good}: resume with --train.resume={good}"
