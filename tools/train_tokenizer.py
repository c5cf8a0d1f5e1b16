#!/usr/bin/env python
"""Train a byte-level BPE tokenizer locally with Hugging Face `tokenizers`.

  python tools/train_tokenizer.py --input corpus/ --vocab-size 8192 --output tokenizer.json
  python tools/train_tokenizer.py --stdlib --vocab-size 4096 --output tok.json   (the default corpus)
"""
from __future__ import annotations

import argparse

from sparselm.data.tokenizer import train_bpe


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="*", default=[], help="files, directories or globs (.txt, .jsonl)")
    parser.add_argument("--json-key", "--json-keys", dest="json_key", default="text", help="key of .jsonl records")
    parser.add_argument("--skip-invalid-records", action="store_true",
                        help="skip .jsonl lines whose key is missing or not a string instead of stopping")
    parser.add_argument("--stdlib", action="store_true", help="train on the embedded default corpus")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not args.input and not args.stdlib:
        parser.error("give --input files or --stdlib")

    def texts():
        if args.stdlib:
            from sparselm.data.corpus import stdlib_files

            for f in stdlib_files():
                yield f.read_text(encoding="utf-8", errors="replace")
        if args.input:
            from sparselm.data.sources import expand_inputs, iter_documents

            yield from iter_documents(expand_inputs(args.input), args.json_key,
                                      {} if args.skip_invalid_records else None)

    from sparselm.errors import RecordError

    try:
        tok = train_bpe(texts(), args.vocab_size, args.output)
    except (FileNotFoundError, RecordError) as err:
        parser.exit(2, f"train_tokenizer.py: error: {err}\n")
    if tok.vocab_size < args.vocab_size:
        note = f" (asked for {args.vocab_size}: the input has too few distinct merges for more; give more text)"
    elif tok.vocab_size > args.vocab_size:
        note = f" (asked for {args.vocab_size}: the 256-byte alphabet and the special token alone need {tok.vocab_size})"
    else:
        note = ""
    print(f"wrote {args.output}: {tok.vocab_size} tokens{note}")
    return args.output


if __name__ == "__main__":
    main()
