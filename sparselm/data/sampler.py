"""Deterministic, resumable global-batch sampler.

The order depends only on (seed, epoch): a permutation of all samples per epoch.  Its whole state is
the number of samples consumed, so resuming, or changing the parallel layout, continues exactly where
training stopped.  By default one epoch: running out is an error that says how much data there is.
"""
from __future__ import annotations

import numpy as np

from sparselm.errors import DataExhausted


def check_steps_available(num_samples: int, consumed: int, steps_left: int, cfg) -> None:
    """The one check that the training data holds ``steps_left`` more global batches after ``consumed``
    samples (one epoch, unless data.allow_repeat).  Raises DataExhausted naming the sizes and the fix."""
    t = cfg.train
    if num_samples <= 0:
        raise DataExhausted(f"the dataset holds no complete sample of data.seq_len={cfg.data.seq_len} tokens; use more "
                            "data or a shorter data.seq_len")
    available = (num_samples - consumed) // t.global_batch_size
    if not cfg.data.allow_repeat and available < steps_left:
        raise DataExhausted(
            f"the training data holds {num_samples} samples of {cfg.data.seq_len} tokens: enough for {available} "
            f"more steps at train.global_batch_size={t.global_batch_size}, but train.steps asks for {steps_left}; "
            "add data, lower train.steps, or set data.allow_repeat=true")


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int, allow_repeat: bool = False, consumed: int = 0,
                 shuffle: bool = True):
        if num_samples <= 0:
            raise DataExhausted("the dataset holds no complete sample; use more data or a shorter data.seq_len")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.allow_repeat = allow_repeat
        self.consumed = consumed
        self.shuffle = shuffle  # False: the dataset is a stream already mixed and shuffled (a blend)
        self._epoch, self._perm = -1, None
        self.skipped = 0  # global batches skipped on purpose (train.skip_batches), part of the state

    def steps_available(self) -> int | None:
        """Whole global batches left in one epoch (None when repeating is allowed)."""
        return None if self.allow_repeat else (self.num_samples - self.consumed) // self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                          else np.arange(self.num_samples))
        return self._perm

    def next_batch(self) -> np.ndarray:
        """Indices of the next global batch (every rank computes the same ones and takes its slice)."""
        end = self.consumed + self.global_batch_size
        if not self.allow_repeat and end > self.num_samples:
            raise DataExhausted(
                f"the training data is used up: {self.num_samples} samples make {self.num_samples // self.global_batch_size} "
                f"global batches of {self.global_batch_size}, and one-epoch training never repeats a sample; "
                "add data, lower train.steps, or set data.allow_repeat=true")
        out = []
        for pos in range(self.consumed, end):
            epoch, within = divmod(pos, self.num_samples)
            out.append(self._permutation(epoch)[within])
        self.consumed = end
        return np.asarray(out, dtype=np.int64)

    def skip(self, batches: int) -> None:
        """Pass over the next ``batches`` global batches (raises DataExhausted as drawing them would)."""
        for _ in range(batches):
            self.next_batch()
        self.skipped += batches

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.shuffle and state["num_samples"] != self.num_samples:  # a blend's stream is prefix-stable
            raise DataExhausted(f"the checkpoint was trained on a dataset of {state['num_samples']} samples but this one has {self.num_samples}; resume with the same data and data.seq_len")
        self.consumed = state["consumed"]
        self.skipped = state.get("skipped", 0)
