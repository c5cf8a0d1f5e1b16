"""Stopping a run early without losing work: signals, a wall-clock budget, time-based checkpoints.

SIGTERM (SLURM's time limit, ``scancel``, a preempting scheduler), SIGUSR1 (``sbatch --signal=USR1@120``)
and SIGINT (Ctrl-C) only set a flag here: the step in progress finishes, every rank saves a checkpoint
through the trainer's usual save, and the process exits with ``REQUEUE_EXIT``.  A save is never cut
short by the first signal; a second SIGTERM or SIGINT ends the process at once (the checkpoint being
written then is left incomplete and ``checkpoints/latest`` keeps naming the previous one).  SIGUSR1 is
a warning: repeating it changes nothing.  ``train.stop_file`` asks the same without a signal: the sbatch
scripts create it when SLURM warns them, since a signal sent to a job step reaches every process in it
(a compiler or worker the rank started would die of SIGUSR1) and is lost before a rank's handler exists.

The decision is taken collectively once per optimizer step (one small all-reduce over the world), so
every rank stops after the same step even when the signal or the clock reaches them at different times.

In the spirit of Megatron's ``--exit-signal-handler`` / ``--exit-duration-in-mins`` and of Lightning's
SLURM requeue on SIGUSR1.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import NamedTuple

import torch.distributed as dist

REQUEUE_EXIT = 75
"""Exit status of a run that stopped early (signal or ``train.max_minutes``) after saving a checkpoint:
run the same command with ``--train.resume=latest`` to continue.  75 is sysexits' EX_TEMPFAIL
("temporary failure, retry"); the sbatch scripts requeue the job on it."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_early: list[int] = []  # signals received between catch_early() and the StopGuard


def catch_early() -> None:
    """Record the stop signals from process start until the trainer's StopGuard takes over (start-up, e.g.
    imports and data preparation, can last minutes): such a signal then stops the run after its first
    step, with a checkpoint, instead of killing it.  Main thread only."""
    def record(signum, frame):
        if _early and signum == signal.SIGUSR1:
            return
        if _early:  # a second one: die of it, as later on
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _early.append(signum)
        if os.environ.get("RANK", "0") == "0":
            print(f"sparselm: got {signal.Signals(signum).name} during start-up: the run will save and stop after its "
                  "first step (a SIGTERM or SIGINT now exits at once)", flush=True)

    for sig in SIGNALS:
        signal.signal(sig, record)
        signal.siginterrupt(sig, False)


class Decision(NamedTuple):
    """What the loop does after a step: ``save`` a checkpoint now; ``stop``: why it ends the run early
    ('' to go on)."""
    save: bool
    stop: str


class StopGuard:
    """Signal handlers and clocks for one ``Trainer.run()``; ``check()`` after every step.

    ``save_every_minutes``: a checkpoint whenever that many minutes passed since the last one (0: never);
    ``max_minutes``: save and stop once the run has lasted that long (0: no limit); both measured from
    the construction of this object on each rank, agreed by the all-reduce.  ``group``: the process
    group to agree over (None: the default group)."""

    def __init__(self, save_every_minutes: float = 0.0, max_minutes: float = 0.0, say=print, group=None,
                 stop_file: str = ""):
        self.stop_file = stop_file
        self.save_every_s = save_every_minutes * 60.0
        self.max_s = max_minutes * 60.0
        self.say = say
        self.group = group
        self.started = self.last_save = time.monotonic()
        self.received: int | None = _early[0] if _early else None  # the first signal's number (start-up's)
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal only works there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
                signal.siginterrupt(sig, False)  # restart system calls (gloo's socket reads) instead of EINTR

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGUSR1 and self.received is not None:
            return  # a repeated warning (a scheduler may send several), not "exit now"
        if self.received is None:
            self.received = signum
            self.say(f"sparselm: got {signal.Signals(signum).name}: finishing this step, saving a checkpoint and "
                     f"exiting with status {REQUEUE_EXIT} (a SIGTERM or SIGINT now exits at once, without saving)")
            return
        # Second signal: die of it (status 128+N), as an unhandled signal would; the atomic checkpoint
        # write leaves `latest` naming the previous complete checkpoint.
        sys.stdout.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def saved(self) -> None:
        """Call after every checkpoint: time-based saves count from here."""
        self.last_save = time.monotonic()

    def check(self) -> Decision:
        """Collective (every rank, after every step): whether to save now and whether to stop."""
        import torch  # here, so that catch_early() costs no torch import at process start

        now = time.monotonic()
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if self.stop_file and rank0 and self.received is None and os.path.exists(self.stop_file):
            self.received = signal.SIGUSR1  # asked through the file: as SIGUSR1
            self.say(f"sparselm: {self.stop_file} exists: finishing this step, saving a checkpoint and exiting "
                     f"with status {REQUEUE_EXIT}")
        flags = torch.tensor([float(self.received is not None),
                              float(self.max_s > 0 and now - self.started >= self.max_s),
                              float(self.save_every_s > 0 and now - self.last_save >= self.save_every_s)])
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        signalled, out_of_time, save_due = (bool(f) for f in flags.tolist())
        stop = ("asked to stop" if signalled else
                f"train.max_minutes={self.max_s / 60:g} reached" if out_of_time else "")
        return Decision(save=bool(stop) or save_due, stop=stop)

    def close(self) -> None:
        """Put back the handlers that were there before (lets a test run several trainers in one process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _early.clear()
