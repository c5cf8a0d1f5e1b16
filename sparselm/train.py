"""Entry point: ``python -m sparselm.train --config NAME_OR_PATH [--section.key=value ...]``.

The same module runs under ``deepspeed --module sparselm.train`` and ``torchrun -m sparselm.train``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # a real run: from here on a stop signal during start-up cannot kill it
    from sparselm.training.preemption import catch_early

    catch_early()

from sparselm.config import ConfigError, describe, list_presets
from sparselm.errors import EXIT_STATUS, USER_ERRORS, DistributedStartError, LoopbackAddressError, PeerLostError
from sparselm.training.launch import prepare, start
from sparselm.training.peers import lost_peer, report_start_failure
from sparselm.training.preemption import REQUEUE_EXIT

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
    """Train; with ``argv`` given (tests), errors are raised instead of printed."""
    say_here = False  # this rank's own start-up error is news on its node: print it whatever its rank
    try:
        name, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        if name is None:
            raise ConfigError(f"no --config given; name a preset ({', '.join(list_presets())}) or a YAML path, "
                              "e.g. --config tiny_dense")
        try:
            cfg = prepare(name, overrides, say=_say)
        except USER_ERRORS as err:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not isinstance(err, DistributedStartError):
                # the other ranks stop with it at once; this node's log says why when rank 0 did not fail too
                say_here = report_start_failure(err, _timeout_minutes(overrides))
            raise
        trainer = None
        try:
            trainer = start(cfg)
            record = trainer.run()
        except tuple(EXIT_STATUS):
            if trainer is not None:
                trainer.close()
            raise
        except RuntimeError as err:  # a peer lost or hung: nothing to close, its collectives would wait on it
            lost = None if isinstance(err, USER_ERRORS) else lost_peer(err, getattr(trainer, "hosts", None),
                                                                       cfg.parallel.timeout_minutes)
            if lost is None:
                raise
            raise lost from err
        trainer.close()  # releases the process groups: a caller may train again in this process
        if trainer.stopped_early:  # a checkpoint was saved: the same command with --train.resume=latest continues
            sys.exit(REQUEUE_EXIT)
        return record
    except (*EXIT_STATUS, *USER_ERRORS) as err:
        if argv is not None:
            raise
        # every rank stops; one says why (any rank when the group could not form: rank 0 may be the one missing).
        # Bad input exits 2; a run-time failure after which nothing saved is lost exits with its own status.
        # a lost peer and a loopback address are seen by every rank alike: one line per node
        alike = isinstance(err, (PeerLostError, LoopbackAddressError))
        _say(f"sparselm: error: {err}", sys.stderr, per_node=alike,
             every_rank=say_here or (isinstance(err, DistributedStartError) and not alike))
        sys.exit(EXIT_STATUS.get(type(err), 2))


def _timeout_minutes(overrides: list[str]) -> float:
    """parallel.timeout_minutes from the command line when the config itself could not be read (30 otherwise)."""
    for i, arg in enumerate(overrides):
        key, _, value = arg.partition("=")
        if key == "--parallel.timeout_minutes":
            value = value or (overrides[i + 1] if i + 1 < len(overrides) else "")
            try:
                return float(value)
            except ValueError:
                break
    return 30.0


def _say(line: str, stream=None, every_rank: bool = False, per_node: bool = False) -> None:
    """Print on global rank 0 only (before the process group exists, from the launcher's RANK); ``per_node``: on
    each node's local rank 0; ``every_rank``: everywhere."""
    if every_rank or os.environ.get("RANK", "0") == "0" or (per_node and os.environ.get("LOCAL_RANK", "0") == "0"):
        print(line, file=stream or sys.stdout, flush=True)


if __name__ == "__main__":
    main()
