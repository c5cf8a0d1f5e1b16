"""Raw-text sources: .txt files (one document each) and .jsonl records (one document per line)."""
from __future__ import annotations

import glob
import json
from pathlib import Path


def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json"))
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input '{item}' matches no file")
            files += [Path(m) for m in matches]
    return files


def iter_documents(files: list[Path], key: str):
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno} is not valid JSON ({err})") from None
                    if key not in record:
                        raise ValueError(f"{path}:{lineno} has no key '{key}'; choose --json-keys among {sorted(record)}")
                    yield str(record[key])
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
