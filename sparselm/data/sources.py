"""Raw-text sources: .txt files (one document each) and .jsonl records (one document per line)."""
from __future__ import annotations

import glob
import json
from pathlib import Path

from sparselm.errors import RecordError


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


def iter_documents(files: list[Path], key: str, skipped: dict[str, int] | None = None):
    """Yield one text per .txt file and per .jsonl line's ``key``.

    A .jsonl line that is not a JSON object, lacks ``key`` or holds a non-string value there (null, a number,
    a list) raises RecordError naming ``file:line`` and the key; nothing is converted with ``str()``.  With
    ``skipped`` (a dict), such lines are skipped instead and counted there by reason."""
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise RecordError(f"{path}:{lineno} is not valid JSON ({err})") from None
                    problem = _record_problem(record, key)
                    if problem is None:
                        yield record[key]
                    elif skipped is None:
                        raise RecordError(f"{path}:{lineno} {problem[1]}; fix the record or pass --skip-invalid-records "
                                          "to skip such lines")
                    else:
                        skipped[problem[0]] = skipped.get(problem[0], 0) + 1
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _record_problem(record, key: str) -> tuple[str, str] | None:
    """(reason, message) when ``record[key]`` is not a text, else None."""
    if not isinstance(record, dict):
        return "not an object", f"is a JSON {type(record).__name__}, not an object with key '{key}'"
    if key not in record:
        return f"no key '{key}'", f"has no key '{key}'; choose --json-keys among {sorted(record)}"
    value = record[key]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        return f"'{key}' not a string", f"has '{key}': {json.dumps(value)[:40]} ({kind}), not a string"
    return None
