"""The embedded default corpus: the Python standard library source of the running interpreter.

Present on every machine and offline.  Files are split into train and validation by a hash of their
relative path (deterministic), tokenized once and cached as Megatron indexed datasets.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

from sparselm.data.indexed import write_indexed


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.rglob("*.py") if "site-packages" not in p.parts), key=lambda p: str(p.relative_to(root)))


def is_valid_split(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSELM_CACHE", Path.home() / ".cache" / "sparselm"))


def build_default_corpus(tokenizer, valid_fraction: float, cache_dir: str = "") -> tuple[str, str]:
    """Return (train_prefix, valid_prefix), building them once per cache directory, interpreter, tokenizer and split.

    Builders of one cache directory take turns on a file lock beside it, so the corpus is tokenized once on a
    cache every node shares and once per node on node-local caches, never once per rank; the build goes to a
    ``mkdtemp`` directory (unique across hosts sharing a home, where pids may repeat) renamed into place whole."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tag = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{tokenizer.name}-v{int(valid_fraction * 10_000)}"
    final = Path(cache_dir or default_cache_dir()) / tag
    if (final / "done").exists():
        return str(final / "train"), str(final / "valid")
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{tag}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (final / "done").exists():
            _build(root, final, tokenizer, valid_fraction)
    return str(final / "train"), str(final / "valid")


def _build(root: Path, final: Path, tokenizer, valid_fraction: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-{socket.gethostname()}-", dir=final.parent))
    try:
        files = stdlib_files()
        print(f"sparselm: tokenizing the default corpus ({len(files)} files) into {final} on {socket.gethostname()}, "
              f"once per cache directory", flush=True)
        split = {name: [f for f in files if is_valid_split(str(f.relative_to(root)), valid_fraction) == (name == "valid")]
                 for name in ("train", "valid")}
        for name, group in split.items():
            docs = (tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")) + [tokenizer.eod_id] for f in group)
            write_indexed(tmp / name, docs, tokenizer.vocab_size)
        (tmp / "done").write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)  # a partial directory no lock holder finished (no "done")
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
