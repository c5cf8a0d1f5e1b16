"""Entry point: ``python -m sparselm.train --config NAME_OR_PATH [--section.key=value ...]``.

The same module runs under ``deepspeed --module sparselm.train`` and ``torchrun -m sparselm.train``.
"""
from __future__ import annotations

import os
import sys

from sparselm.config import ConfigError, describe, load_config

USAGE = """usage: python -m sparselm.train --config NAME_OR_PATH [--section.key=value ...]
       python -m sparselm.train --help-config      (every key, its default and meaning)"""


def parse_args(argv: list[str]):
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    config, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg == "--help-config":
            print(describe())
            sys.exit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a preset name or a YAML path")
            config, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config, i = arg.split("=", 1)[1], i + 1
            continue
        rest.append(arg)
        i += 1
    return config, rest


def main(argv: list[str] | None = None) -> dict:
    from sparselm.checkpoint import CheckpointError
    from sparselm.data.indexed import DatasetError
    from sparselm.data.sampler import DataExhausted

    try:
        name, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(name, overrides)
        from sparselm.trainer import Trainer

        return Trainer(cfg).run()
    except (ConfigError, CheckpointError, DatasetError, DataExhausted, FileNotFoundError) as err:
        if argv is not None:
            raise
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says why
            print(f"sparselm: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
