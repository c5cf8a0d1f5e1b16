"""The errors sparselm raises for bad input, in one place.

Each message names the problem and the fix; entry points print it as one line (rank 0) and exit 2.
The modules that raise them re-export their own (``sparselm.config.ConfigError`` etc.).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the fix."""


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or empty; the message names it and the fix."""


class RecordError(DatasetError):
    """An input record that holds no text under the requested key; the message names file, line and key."""


class DataExhausted(RuntimeError):
    """The data cannot supply the requested steps without repeating samples."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message names the file."""


class ConversionError(RuntimeError):
    """A conversion cannot be done faithfully; the message names the setting that prevents it."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (no space, permission, quota, I/O error); its partial directory was
    removed and every earlier checkpoint kept.  The message names the path, the error and the space."""


class DivergenceError(RuntimeError):
    """Training stopped after ``train.max_skipped_steps`` consecutive non-finite steps; the message names the
    step, the quantity, the last good checkpoint and how to resume past the bad batches."""


class PeerLostError(RuntimeError):
    """A peer rank was lost during the run (its process killed, its node down) or stopped answering within
    parallel.timeout_minutes; every checkpoint already written is complete.  The message names the host where
    the transport says which; exit status 69, which the sbatch scripts requeue."""


class DistributedStartError(RuntimeError):
    """The ranks could not form their process group (unreachable rendezvous, a node never started)."""


class LoopbackAddressError(DistributedStartError):
    """A node resolves its own name to a loopback address while the world spans nodes: gloo would hand the
    others an address they cannot reach.  Every rank learns it from the rendezvous store, so it is reported
    once per node."""


USER_ERRORS = (ConfigError, DatasetError, DataExhausted, CheckpointError, ConversionError, FileNotFoundError,
               DistributedStartError)
"""What entry points report as one line instead of a traceback."""

EXIT_STATUS = {SaveError: 74, DivergenceError: 65, PeerLostError: 69}
"""Exit status of ``sparselm.train`` for the run-time failures that are not bad input (which exit 2): 74
(sysexits' EX_IOERR) when a checkpoint could not be written, 65 (EX_DATAERR) when training diverged, 69
(EX_UNAVAILABLE) when a peer rank was lost or stopped answering (requeued by the sbatch scripts).
75 (``sparselm.training.preemption.REQUEUE_EXIT``) is a stop after a checkpoint was saved."""


def require(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless ``cond``: the start-up checks of every config section use it."""
    if not cond:
        raise ConfigError(msg)
