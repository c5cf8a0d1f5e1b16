#!/usr/bin/env python
"""Turn .txt / .jsonl files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

Megatron-style flags:
  python tools/preprocess_data.py --input data.jsonl --output-prefix data/mycorpus \\
      --json-keys text --tokenizer byte --append-eod --workers 2

--input takes files, directories (all .txt/.jsonl/.json inside) or globs.  A .txt file is one
document; each .jsonl line is one document per --json-keys key (a prefix per key when several keys
are given: PREFIX_KEY).  Files are written with megatron-core's own IndexedDatasetBuilder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import Pool

from sparselm.data.indexed import write_indexed
from sparselm.data.sources import RecordError, expand_inputs, iter_documents
from sparselm.data.tokenizer import load_tokenizer
from sparselm.training.runtime import quiet_third_party

_TOKENIZER = None


def _init(spec: str, eod_token: str = "") -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec, eod_token)


def _encode(args: tuple[str, bool]) -> list[int]:
    text, append_eod = args
    ids = _TOKENIZER.encode(text)
    return ids + [_TOKENIZER.eod_id] if append_eod else ids


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt, .jsonl)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys of .jsonl records to extract")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    parser.add_argument("--eod-token", default="", help="text of the end-of-document token when the tokenizer does "
                                                          "not tell it (as data.eod_token)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--skip-invalid-records", action="store_true",
                        help="skip .jsonl lines whose key is missing or not a string (counted in the summary) "
                             "instead of stopping at the first one")
    args = parser.parse_args(argv)

    quiet_third_party()
    files = expand_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
    prefixes = []
    for key in args.json_keys:
        prefix = args.output_prefix if len(args.json_keys) == 1 else f"{args.output_prefix}_{key}"
        skipped: dict[str, int] | None = {} if args.skip_invalid_records else None
        docs = ((text, args.append_eod) for text in iter_documents(files, key, skipped))
        if args.workers > 1:
            with Pool(args.workers, initializer=_init, initargs=(args.tokenizer, args.eod_token)) as pool:
                count, tokens = write_indexed(prefix, pool.imap(_encode, docs, chunksize=16), tokenizer.vocab_size)
        else:
            _init(args.tokenizer, args.eod_token)
            count, tokens = write_indexed(prefix, map(_encode, docs), tokenizer.vocab_size)
        size = os.path.getsize(prefix + ".bin")
        with open(prefix + ".meta.json", "w", encoding="utf-8") as fh:  # what the start-up checks compare
            json.dump({"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                       "documents": count, "tokens": tokens}, fh)
        note = "".join(f", skipped {n} ({why})" for why, n in sorted((skipped or {}).items()))
        print(f"wrote {prefix}.bin/.idx: {count} document{'s' if count != 1 else ''}, {tokens:,} tokens, {size:,} bytes "
              f"({tokenizer.name} tokenizer){note}")
        prefixes.append(prefix)
    return prefixes


def cli() -> int:
    """Command-line entry: bad input ends with one line naming it, exit status 2."""
    from sparselm.data.indexed import DatasetError

    try:
        main()
    except (DatasetError, RecordError, FileNotFoundError) as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
