"""The training loop: config -> data -> model -> parallel layout -> DeepSpeed engine -> steps.

Every launch mode runs this same path (a plain process is a world of one).  Losses and metrics are
averaged over the whole global batch, so they do not depend on the layout.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sparselm.checkpoint import checkpointing as ckpt
from sparselm.checkpoint.engine_state import load_full_state, load_state
from sparselm.checkpoint.integrity import earlier_line
from sparselm.config import ConfigError, to_dict, to_yaml
from sparselm.data.blend import is_blend, parse_blend
from sparselm.data.indexed import DatasetError
from sparselm.data.loader import build_blend, build_datasets
from sparselm.data.prefetch import Prefetcher
from sparselm.data.sampler import GlobalBatchSampler, check_steps_available
from sparselm.data.tokenizer import load_tokenizer
from sparselm.data.vocab import derive_vocab_size
from sparselm.errors import CheckpointError, DivergenceError
from sparselm.model import build_model
from sparselm.parallel.materialize import build_sharded
from sparselm.parallel.topology import Topology
from sparselm.parallel.zero3 import Zero3Partitioner
from sparselm.planning.flops import device_peak_tflops, flop_counts, summary_lines
from sparselm.training import run_lock
from sparselm.training.compile import compile_blocks
from sparselm.training.engine import build_ds_config, build_engine, settle_pipeline_zero_stage
from sparselm.training.metrics import MetricsWriter, format_line
from sparselm.training.nonfinite import NonFiniteGuard
from sparselm.training.optim import lr_at, set_lr
from sparselm.training.peers import agree_on_start, check_tp_placement, describe_hosts, gather_hosts
from sparselm.training.preemption import StopGuard
from sparselm.training.preflight import absolute_paths, find_resume
from sparselm.training.runtime import forget_solo_world, init_distributed, release_free_memory
from sparselm.training.shared_files import agree_on_data, agree_on_run_dir, data_fingerprint
from sparselm.training.steps import EngineSteps, PipelineSteps


class Restored(NamedTuple):
    """A checkpoint opened for resuming: where it is, its meta.json, model tensors and optimizer moments
    (``checkpoint_shards.ShardReader``: each rank reads only the boxes its pieces need; None: no moments)."""
    path: Path
    meta: dict
    tensors: object
    moments: object


def resolve_vocab(cfg, tokenizer) -> None:
    """model.vocab_size from the tokenizer when it is 0 (``sparselm.data.vocab.padded_vocab_size``); an explicit
    size must hold every token.  Raises ConfigError naming both sizes when it does not."""
    derive_vocab_size(cfg, tokenizer)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; set 0 to derive it")


class Trainer:
    """One training run: construction is the list of steps in __init__, ``run()`` the loop, ``close()`` the end."""

    def __init__(self, cfg):
        absolute_paths(cfg)  # the config.yaml it saves then works from any directory
        self.cfg = cfg
        self._start_processes()
        try:
            self._construct()
        except BaseException:
            if self.is_rank0:  # a start-up that failed leaves no run directory it created itself
                run_lock.release(self.cfg.train.out_dir, remove_if_created=True)
            raise

    def _construct(self) -> None:
        # from here on, SIGTERM/SIGUSR1/SIGINT stop the run after its next step, with a checkpoint
        cfg = self.cfg
        self.resume_from = self._verified_resume()
        self.guard = StopGuard(cfg.train.save_every_minutes, cfg.train.max_minutes, stop_file=cfg.train.stop_file,
                               say=print if self.is_rank0 else (lambda line: None))
        self.nonfinite = NonFiniteGuard(cfg.train.max_skipped_steps, fp16=self.ds_config.get("fp16", {}).get("enabled", False))
        self._open_data()
        restored = self._read_resume_checkpoint()
        self._build_module(restored)
        if self.cfg.train.compile:  # per block, before the engine wraps the module (sparselm/training/compile.py)

            compile_blocks(self.module)
        self._build_engine()
        self.step = 0
        if restored is not None:
            self._restore(restored)
        self._skip_batches()
        self._check_data_suffices()
        self._open_run_dir()
        self.saver = ckpt.CheckpointWriter(self.cfg.train.out_dir, self.cfg.train.keep_last, self.cfg.train.async_save)

    # ---------------------------------------------------------------------------- construction
    def _start_processes(self) -> None:
        """Process group, layout and the DeepSpeed JSON: every check that needs no data or model."""
        self.device = init_distributed(self.cfg.parallel.timeout_minutes)
        agree_on_start(None)  # a rank whose own checks failed says so here, and every rank stops with it
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_rank0 = self.rank == 0
        self.topo = Topology(self.cfg)
        self._place_ranks()
        self.ds_notes: list[str] = []
        # refuses a JSON sparselm cannot honour; the engine resolves it again (same result) when it is built
        self.ds_config = build_ds_config(self.cfg, self.topo.dp_size, self.ds_notes)
        self.resume_from = find_resume(self.cfg)
        self._lock_run_dir()  # after the checks above, so a refused config leaves no directory behind
        if self.world > 1:
            self._agree_on_run_dir()

    def _place_ranks(self) -> None:
        """Gather every rank's host, log them once (rank 0, several ranks) and refuse a tensor-parallel group
        that spans hosts unless parallel.tp_across_nodes (every rank raises the same ConfigError)."""
        self.hosts = gather_hosts()
        if self.is_rank0 and self.world > 1:
            print(f"sparselm: hosts: {describe_hosts(self.hosts)}")
        layout = self.topo.layout
        tp_groups = {tuple(layout.group("tp", r)) for r in range(self.world)}
        try:
            check_tp_placement([list(g) for g in sorted(tp_groups)], self.hosts, self.cfg.parallel.tp_across_nodes)
        except ConfigError:
            self.topo.teardown()
            forget_solo_world()
            raise

    def _lock_run_dir(self) -> None:
        """Rank 0 holds ``train.out_dir``'s run lock until the run ends (``sparselm.training.run_lock``); every rank
        raises the same ConfigError when another run holds it."""
        refusal = [""]
        if self.is_rank0:
            try:
                run_lock.acquire(self.cfg.train.out_dir)
            except ConfigError as err:
                refusal[0] = str(err)
        if self.world > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            self.topo.teardown()  # as close() does: a caller may start another run in this process
            forget_solo_world()
            raise ConfigError(refusal[0])

    def _agree_on_run_dir(self) -> None:
        """train.out_dir is one directory on every rank and rank 0's resume choice is everyone's
        (``shared_files.agree_on_run_dir``); on a refusal rank 0 releases the run directory it locked."""
        try:
            self.resume_from = agree_on_run_dir(Path(self.cfg.train.out_dir), self.resume_from, self.hosts)
        except ConfigError:
            if self.is_rank0:
                run_lock.release(self.cfg.train.out_dir, remove_if_created=True)
            self.topo.teardown()
            forget_solo_world()
            raise

    def _open_data(self) -> None:
        """Tokenizer, vocabulary size, datasets (rank 0 tokenizes the default corpus first; the others then open its
        cache, or, where the cache is node-local, one rank per node builds it under the cache's file lock while the
        node's others wait), the sampler and the micro-batch."""
        cfg, t = self.cfg, self.cfg.train
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
        resolve_vocab(cfg, self.tokenizer)
        self.blended = is_blend(cfg.data.dataset)
        build = ((lambda: build_blend(cfg.data, self.tokenizer, t.steps * t.global_batch_size, t.seed)) if self.blended
                 else (lambda: build_datasets(cfg.data, self.tokenizer)))
        if self.is_rank0:
            self.train_data, valid = build()
        dist.barrier()
        if not self.is_rank0:
            self.train_data, valid = build()
        # validation sets by name ("" for a single one) and the weights their losses are averaged with
        self.valid_sets = valid if isinstance(valid, dict) else {"": valid}
        self.valid_weights = ({s.name: s.weight for s in parse_blend(cfg.data.valid_dataset or cfg.data.dataset)}
                              if isinstance(valid, dict) else {"": 1.0})
        self.sampler = GlobalBatchSampler(len(self.train_data), t.global_batch_size, t.seed,
                                          cfg.data.allow_repeat and not self.blended, shuffle=not self.blended)
        self.micro = t.micro_batch_size or t.global_batch_size // self.topo.dp_size
        if self.world > 1:
            agree_on_data(data_fingerprint(self.train_data, self.valid_sets), self.hosts)
        self._check_validation_data()

    def _verified_resume(self) -> Path | None:
        """The checkpoint to resume from, every file verified against its checksum by the ranks together
        (``checkpointing.verify_collectively``) before anything is read.  A damaged one stops every rank with the
        first problem and the newest earlier checkpoint that verifies; with ``train.resume=latest`` and
        ``train.resume_fallback`` that checkpoint is resumed instead, said on rank 0.  Nothing is deleted."""
        t = self.cfg.train
        path = self.resume_from
        if path is None:
            return None
        fallback = t.resume == "latest" and t.resume_fallback
        if fallback:  # start from latest itself: find_resume may have skipped one whose meta.json is damaged
            path = ckpt.latest_checkpoint(t.out_dir) or path
        candidates = ckpt.resume_candidates(path)
        problems = ckpt.verify_collectively(candidates[0])
        if not problems:
            return path
        good = next((c for c in candidates[1:] if not ckpt.verify_collectively(c)), None)
        if not (fallback and good is not None):
            hint = ("; or set --train.resume_fallback=true to resume from it"
                    if t.resume == "latest" and good is not None else "")
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            self.topo.teardown()  # as close() does: a caller may start another run in this process
            forget_solo_world()
            raise CheckpointError(f"not resuming from damaged {path}: {problems[0]}{more}{earlier_line(good)}{hint}")
        if self.is_rank0:
            print(f"sparselm: checkpoint {path} is damaged ({problems[0]}"
                  f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}): resuming from {good}, the newest "
                  "checkpoint that verifies (train.resume_fallback=true); no checkpoint was deleted", flush=True)
        return good

    def _read_resume_checkpoint(self) -> Restored | None:
        if self.resume_from is None:
            return None
        path = self.resume_from
        meta = ckpt.read_meta(path)
        # _verified_resume hashed every file already (one rank each): readers need not hash them again
        return Restored(path, meta, ckpt.open_model_tensors(path, meta, verify=False),
                        ckpt.open_optimizer_tensors(path, meta, verify=False))

    def _build_module(self, restored: Restored | None) -> None:
        """This rank's pieces of the model only (``parallel.materialize.build_sharded``): from the checkpoint when
        resuming (no random init), else from the seeded init, so every layout and ZeRO stage starts from
        the one-process weights."""
        reference = build_model(self.cfg, device="meta")
        self.num_params = (reference.num_params(), reference.num_params(active=True))
        self.flops_per_token = flop_counts(self.cfg).per_token  # training (fwd + bwd) model FLOPs
        tensors = None
        if restored is not None:
            ckpt.check_tensors_match(reference, restored.tensors, restored.path)
            tensors = restored.tensors
        partitioner = None
        if self.ds_config["zero_optimization"].get("stage", 0) == 3:  # partitioned as built, never whole

            partitioner = Zero3Partitioner(self.ds_config, self.topo, self.cfg.parallel.zero3_experts_per_gather)
        self.module = build_sharded(self.cfg, self.topo, tensors, partitioner=partitioner)

    def _build_engine(self) -> None:
        """The DeepSpeed engine over the module, and the step functions for its kind (pipeline or not)."""
        cfg, topo = self.cfg, self.topo
        if topo.pp > 1:
            note = settle_pipeline_zero_stage(self.module, cfg, topo.pp_group)
            if note and self.is_rank0:
                print(f"sparselm: {note}")
            self.engine, self.ds_config = build_engine(self.module, cfg, topo.dp_size, mpu=None,
                                                       norm_mpu=topo.parallel_state_mpu, nonfinite=self.nonfinite)
            self.steps = PipelineSteps(self.engine, self.module, self.device, self.micro, topo.pp_group)
        else:
            self.engine, self.ds_config = build_engine(self.module, cfg, topo.dp_size, mpu=topo.mpu,
                                                       norm_mpu=topo.parallel_state_mpu, nonfinite=self.nonfinite)
            self.steps = EngineSteps(self.engine, self.module, self.device, self.micro)

    def _restore(self, restored: Restored) -> None:
        meta = restored.meta
        if meta.get("version", 1) >= 2:
            load_state(self.engine, self.module, restored.tensors, restored.moments or {}, meta["optimizer_step"],
                       self._groups())
        else:  # format 1: whole tensors, each rank cutting its pieces
            load_full_state(self.engine, self.module, restored.tensors, restored.moments, meta["optimizer_step"],
                            self._groups())
        release_free_memory()
        if meta["sampler"] is not None:  # None: a converted model, trained from the start of the data
            self.sampler.load_state_dict(meta["sampler"])
        self.step = meta["step"]
        if meta["layout"] == self.topo.as_dict():
            states = ckpt.read_rng(restored.path, meta, self.rank, verify=False)
            if states is not None:
                ckpt.set_rng_state(states)
        if self.is_rank0:
            print(f"sparselm: resumed from {restored.path} at step {self.step}")
            if meta["sampler"] is None or restored.moments is None:
                print(f"sparselm: {restored.path} is a model-only checkpoint (consolidated or converted): weights "
                      "only, so " + " and ".join(
                          what for what, lost in (("the data starts from its first sample", meta["sampler"] is None),
                                                  ("Adam's moments start from zero", restored.moments is None)) if lost)
                      + f"; the step count and learning-rate schedule continue from step {self.step}. For an exact "
                      "continuation resume from the sharded checkpoint it was made from")

    def _skip_batches(self) -> None:
        """train.skip_batches counts over the whole run: skip what the restored sampler has not skipped yet."""
        todo = self.cfg.train.skip_batches - self.sampler.skipped
        if todo > 0:
            self.sampler.skip(todo)
            if self.is_rank0:
                print(f"sparselm: skipping {todo} global batch(es) after step {self.step} (train.skip_batches="
                      f"{self.cfg.train.skip_batches} over the run); training resumes on the batches that follow")

    def _check_data_suffices(self) -> None:
        check_steps_available(len(self.train_data), self.sampler.consumed, self.cfg.train.steps - self.step, self.cfg)

    def _open_run_dir(self) -> None:
        """config.yaml, ds_config.json (what DeepSpeed ran with), the start-up summary and the metric sinks."""
        cfg = self.cfg
        self.out_dir = Path(cfg.train.out_dir)
        if self.is_rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
            (self.out_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
            for note in self.ds_notes:
                print(f"sparselm: ds_config: {note}")
            print(f"sparselm: {self.world} process(es), layout {self.topo.as_dict()}, "
                  f"{self.num_params[0]:,} parameters ({self.num_params[1]:,} active per token)")
            for line in summary_lines(cfg):
                print(f"sparselm: {line}")
            print(to_yaml(cfg))
        self.peak_tflops = device_peak_tflops(cfg, self.ds_config, self.device)  # None: no mfu (CPU, unknown GPU)
        self.writer = MetricsWriter(self.out_dir, cfg.train.tensorboard, self.is_rank0,
                                    resume_step=self.step if self.resume_from is not None else None,
                                    wandb_project=cfg.train.wandb_project, config=to_dict(cfg))

    # ----------------------------------------------------------------------------------------
    def _groups(self) -> dict:
        return {"tp": self.topo.tp_group, "ep": self.topo.ep_group}

    def _rank_slice(self, batch: np.ndarray) -> np.ndarray:
        per_rank = len(batch) // self.topo.dp_size
        return batch[self.topo.dp_rank * per_rank:(self.topo.dp_rank + 1) * per_rank]

    def _dp_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float | list]:
        """Average named scalars/vectors over data-parallel ranks in one all-reduce (and context-parallel ranks:
        their losses are already the whole sequences', their per-forward metrics are pieces' that average to it)."""
        names = sorted(values)
        flat = [values[n].detach().float().reshape(-1).cpu() for n in names]
        if not flat:
            return {}
        buf = torch.cat(flat)
        if self.topo.dp_cp_size > 1:
            dist.all_reduce(buf, group=self.topo.dp_cp_group)
            buf /= self.topo.dp_cp_size
        out, i = {}, 0
        for n, f in zip(names, flat):
            chunk = buf[i:i + f.numel()]
            out[n] = chunk.item() if values[n].dim() == 0 else chunk.tolist()
            i += f.numel()
        return out

    def train_step(self, tokens: np.ndarray) -> dict:
        """One optimizer step on this rank's share of a global batch; metrics averaged over the global batch."""
        record = self._dp_mean(self.steps.train(tokens, self.step, self.topo.dp_rank * len(tokens)))
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm)
        self.nonfinite.observe(record, self.engine.was_step_applied())
        return record

    def _divergence_error(self) -> DivergenceError:
        """The error that stops a run after train.max_skipped_steps non-finite steps in a row (raised once the step
        is logged), naming the steps, the quantity, the last good checkpoint and how to resume past it."""
        name, value = self.nonfinite.diverged
        streak, limit = self.nonfinite.streak, self.cfg.train.max_skipped_steps
        self.saver.wait()
        good = ckpt.latest_checkpoint(self.out_dir) or self.resume_from
        first = self.step - streak + 1
        where = (f"the last good checkpoint is {good}: resume from it past the batches since with "
                 f"--train.resume={good} --train.skip_batches="
                 f"{self.sampler.skipped + self.step - ckpt.read_meta(good)['step']}"
                 if good is not None else
                 f"no checkpoint was written yet: start again with --train.skip_batches={self.step}")
        return DivergenceError(
            f"training diverged: steps {first}-{self.step} were not finite ({name} = {value} at step {self.step}) "
            f"and were skipped, {streak} in a row (train.max_skipped_steps={limit}), so the run stops "
            f"without saving; {where} (a lower optim.lr or optim.grad_clip may be needed too)")

    def _eval_samples(self, data) -> int:
        """Validation samples one evaluation uses: up to train.eval_batches global batches, the same number on
        every data-parallel rank (a partial last micro-batch is evaluated; pipelines take whole micro-batches)."""
        per_rank = min(len(data), self.cfg.train.eval_batches * self.cfg.train.global_batch_size)
        per_rank //= self.topo.dp_size
        if self.topo.pp > 1:
            per_rank -= per_rank % self.micro
        return per_rank * self.topo.dp_size

    def _check_validation_data(self) -> None:
        for name, data in self.valid_sets.items():
            if not self.cfg.train.eval_every or self._eval_samples(data) > 0:
                continue
            raise DatasetError(
                f"the validation split{f' of source {name!r}' if name else ''} holds {len(data)} samples of "
                f"{self.cfg.data.seq_len} tokens, fewer "
                f"than one for each of the {self.topo.dp_size} data-parallel rank(s)"
                + (f" ({self.micro}, a whole micro-batch, per pipeline)" if self.topo.pp > 1 else "")
                + ", so evaluation would be skipped; "
                + ("give a larger data.valid_dataset" if self.cfg.data.valid_dataset
                   else "set data.valid_dataset, raise data.valid_fraction")
                + ", or set train.eval_every=0")

    def evaluate(self) -> dict:
        """val_loss (and val_ppl) over the validation data; for several sources also val_loss/<name> of each,
        val_loss being their mean weighted by the blend."""
        local = {}
        for name, data in self.valid_sets.items():
            mine = self._rank_slice(np.arange(self._eval_samples(data)))
            local[f"val_loss/{name}" if name else "val_loss"] = self.steps.evaluate(data.batch(mine))
        out = self._dp_mean(local)
        if "val_loss" not in out:
            out["val_loss"] = sum(self.valid_weights[n] * out[f"val_loss/{n}"] for n in self.valid_sets)
        return {**out, "val_ppl": math.exp(min(out["val_loss"], 50.0))}

    def _batches(self) -> Prefetcher | None:
        """The coming steps' batches (this rank's rows), read ahead on a thread from a copy of the sampler,
        so the sampler saved in checkpoints stays at the step the model is at; None: read on this thread."""
        if not self.cfg.data.prefetch:
            return None
        sampler = copy.deepcopy(self.sampler)
        return Prefetcher(lambda: self.train_data.batch(self._rank_slice(sampler.next_batch())),
                          self.cfg.train.steps - self.step, self.cfg.data.prefetch)

    def save(self) -> Path:
        """A checkpoint of the current step (collective); with train.async_save it is still being written when
        this returns, and ``latest`` names it once complete."""
        return self.saver.save(self.step, self.engine, self.module, self.cfg, self.sampler.state_dict(),
                               self.topo.as_dict(), self._groups())

    def run(self) -> dict:
        """Train from ``self.step`` to train.steps and return the last step's record.  Stops early (after a
        checkpoint, ``stopped_early`` saying why) on a signal, a stop file or train.max_minutes; raises
        DivergenceError after train.max_skipped_steps non-finite steps in a row.  The batch reader, progress bar
        and metric sinks are closed on every way out."""
        t = self.cfg.train
        show_bar = self.is_rank0 and t.progress and sys.stdout.isatty()  # no \r frames in log files
        bar = tqdm(total=t.steps, initial=self.step, disable=not show_bar, unit="step",
                   dynamic_ncols=True, file=sys.stdout)
        say = bar.write if self.is_rank0 else (lambda line: None)
        self.stopped_early = ""  # why the run ended before train.steps ('' when it did not)
        record: dict = {}
        ahead = None
        try:
            if t.eval_every and self.step == 0:  # where training starts from, for comparison
                start = {"step": 0, **self.evaluate()}
                self.writer.write(start)
                say(format_line(start, t.steps))
            ahead = self._batches()
            while self.step < t.steps:
                record = self._one_step(ahead)
                last = self.step == t.steps
                if t.eval_every and (self.step % t.eval_every == 0 or last):
                    record.update(self.evaluate())
                if self.step % t.log_every == 0 or last or "val_loss" in record or "skipped" in record:
                    self.writer.write(record)
                    say(format_line(record, t.steps))
                if self.nonfinite.diverged is not None:
                    raise self._divergence_error()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                bar.update(1)
                decision = self.guard.check()
                due = (t.save_every and self.step % t.save_every == 0) or last or decision.save
                if due and not self.nonfinite.streak:  # never a checkpoint while the steps are not finite
                    path = self.save()
                    self.guard.saved()
                    say(f"saved {path}")
                if decision.stop and not last:
                    self.stopped_early = decision.stop
                    say(f"sparselm: stopped at step {self.step}/{t.steps} ({decision.stop}); "
                        + ("no checkpoint written: the step was not finite; " if self.nonfinite.streak else "")
                        + "resume with --train.resume=latest")
                    break
            self.saver.wait()
        finally:
            if ahead is not None:
                ahead.close()
            bar.close()
            self.writer.close()
        return record

    def _one_step(self, ahead: Prefetcher | None) -> dict:
        """Train one global batch and return its record (losses, norms, lr, throughput, data mix)."""
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_len
        lr = lr_at(self.step, self.cfg.optim, t.steps)
        set_lr(self.engine.optimizer, lr)
        indices = self.sampler.next_batch()
        batch = ahead.next() if ahead is not None else self.train_data.batch(self._rank_slice(indices))
        started = time.perf_counter()
        record = self.train_step(batch)
        elapsed = time.perf_counter() - started
        self.step += 1
        record = {"step": self.step, **record, "lr": lr, "tokens_per_s": tokens_per_step / elapsed,
                  "flops_per_token": self.flops_per_token,
                  "tflops": self.flops_per_token * tokens_per_step / elapsed / self.world / 1e12}
        if self.peak_tflops:
            record["mfu"] = record["tflops"] / self.peak_tflops
        if self.blended:
            record.update({f"data/{name}_samples": n for name, n in
                           self.train_data.consumed_by_source(self.sampler.consumed).items()})
        return record

    def close(self) -> None:
        """Finish a save in flight, release process groups and signal handlers (lets a test build another trainer
        in the same process)."""
        self.saver.close()
        self.guard.close()
        if self.is_rank0:
            run_lock.release(self.cfg.train.out_dir)
        self.topo.teardown()
        forget_solo_world()
