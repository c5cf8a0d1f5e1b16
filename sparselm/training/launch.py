"""Starting a run in this process: the one path every entry point and tool takes from a config name to a
``Trainer`` (``python -m sparselm.train``, ``tools/scaling.py --launch inprocess``, the benchmarks).

Bad input is refused by ``preflight`` before DeepSpeed and megatron-core are imported (seconds, and no
process group), so the trainer's module is imported only once the config has passed.
"""
from __future__ import annotations

from typing import Callable

from sparselm.config import load_config
from sparselm.training.preflight import preflight
from sparselm.training.runtime import quiet_third_party


def prepare(config: str, overrides: list[str], say: Callable[[str], None] | None = None):
    """The resolved, checked config of ``--config config`` plus ``--section.key=value`` overrides.  Each preflight
    note goes to ``say`` (prefixed ``sparselm:``).  Raises ConfigError / DatasetError (sparselm.errors.USER_ERRORS)
    naming the setting and the fix; starts nothing."""
    cfg = load_config(config, overrides, check=False)
    for note in preflight(cfg):  # every check that needs no process group
        if say is not None:
            say(f"sparselm: {note}")
    return cfg


def start(cfg):
    """A constructed ``Trainer`` for a prepared config: the process group joined (a world of one without a
    launcher), data, model and engine built, a resume restored.  The caller runs and closes it."""
    quiet_third_party()
    # deliberate: DeepSpeed and megatron-core come in with the trainer, after the config has passed preflight
    from sparselm.training.trainer import Trainer

    return Trainer(cfg)


def run_in_process(config: str, overrides: list[str]) -> dict:
    """Train to the end in this process and return the last step's record; the trainer is closed either way."""
    trainer = start(prepare(config, overrides))
    try:
        return trainer.run()
    finally:
        trainer.close()
