#!/usr/bin/env python
"""Checkpoint conversions (each goes through sparselm's layout-free checkpoint form).

  consolidate  --input CKPT_OR_RUN --output DIR [--dtype bf16] [--max-shard-gb G]   whole tensors in HF-style shards
  export-hf    --input CKPT_OR_RUN --output DIR [--fused-experts] [--force] [--family F]   the family computing
                                    the model (the imported one first, model.hf_family)
  import-hf    --input HF_DIR      --output DIR [--force] [--drop-mtp]   llama, mistral, mixtral, qwen2, qwen3,
                                    qwen2_moe, qwen3_moe, olmoe, dots1, glm4_moe, gpt_oss, minimax_m2,
                                    deepseek_v3 / kimi_k2, deepseek_v2, glm4_moe_lite, ernie4_5_moe (streamed;
                                    fp8 block-scaled weights read)
  upcycle      --input CKPT_OR_RUN --output DIR --experts N [--top-k K] [--every M]
  inspect      --input CKPT_OR_RUN [--json]
  verify       --input RUN_OR_CKPT [--workers N]         every file against its checksum, one line per checkpoint,
                                                         exit status 1 when any is damaged or incomplete
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from sparselm.checkpoint.checkpointing import (open_model_tensors, open_optimizer_tensors, read_config, read_meta,
                                              resolve_checkpoint, verify_checkpoint)
from sparselm.checkpoint.integrity import Checksums, file_problem, read_manifest, step_of
from sparselm.convert import hf_export, hf_import
from sparselm.convert.store import write_model_checkpoint
from sparselm.convert.upcycle import upcycle as upcycle_tensors
from sparselm.errors import CheckpointError, ConversionError
from sparselm.training.runtime import quiet_third_party

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load(path: str):
    """(checkpoint dir, meta, config, model tensors read on demand) of any checkpoint format."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    verify_checkpoint(ckpt)  # every file, the ones a conversion does not read too
    return ckpt, meta, read_config(ckpt), open_model_tensors(ckpt, meta)


def consolidate(args) -> Path:
    """Whole tensors, streamed: one output shard (at most --max-shard-gb) in memory at a time."""
    ckpt, meta, cfg, tensors = _load(args.input)
    out = write_model_checkpoint(args.output, tensors, cfg, source=f"consolidate {ckpt}", step=meta["step"],
                                 extra_files=_tokenizer_file(ckpt, cfg), dtype=DTYPES[args.dtype],
                                 max_shard_bytes=int(args.max_shard_gb * 2**30))
    files = sorted((out / "model").glob("*.safetensors"))
    print(f"wrote {out}/model/ ({len(tensors)} tensors, {args.dtype}, {len(files)} file(s) + "
          "model.safetensors.index.json) and config.yaml")
    return out


def _tokenizer_file(ckpt: Path, cfg) -> dict:
    """The tokenizer file a converted checkpoint carries along (none for the byte tokenizer)."""
    own = ckpt / "tokenizer.json"
    if own.is_file():
        Checksums(ckpt, read_meta(ckpt)).verify("tokenizer.json")  # copied as read: verified first
        return {"tokenizer.json": own}
    tok = cfg.data.tokenizer
    return {"tokenizer.json": Path(tok)} if tok != "byte" and Path(tok).is_file() else {}


def export_hf(args) -> Path:
    """The Hugging Face family that computes the model (``sparselm.convert.hf_export``)."""
    return hf_export.export_hf(args.input, args.output, args.fused_experts, int(args.max_shard_gb * 2**30), args.force,
                               args.family)


def import_hf(args) -> Path:
    """A Hugging Face model directory of a supported family, streamed tensor by tensor (``sparselm.convert.hf_import``)."""
    return hf_import.import_hf(args.input, args.output, int(args.max_shard_gb * 2**30), args.force, args.drop_mtp)


def upcycle(args) -> Path:
    """Sparse upcycling of a dense checkpoint (``sparselm.convert.upcycle``)."""
    ckpt, meta, cfg, tensors = _load(args.input)
    new_tensors, new_cfg = upcycle_tensors(tensors, cfg, experts=args.experts, top_k=args.top_k, every=args.every, seed=args.seed)
    out = write_model_checkpoint(args.output, new_tensors, new_cfg, source=f"upcycle {ckpt}", extra_files=_tokenizer_file(ckpt, cfg))
    print(f"wrote {out}: {args.experts} experts, top-{args.top_k}, every {args.every} layer(s)")
    return out


def inspect(args) -> dict:
    """Step, layout, versions, layers and every tensor's shape and dtype of a checkpoint (``--json``: as JSON)."""
    ckpt, meta, cfg, tensors = _load(args.input)
    total = sum(math.prod(shape) for shape in tensors.shapes.values())
    info = {
        "checkpoint": str(ckpt), "step": meta["step"], "saved_from_layout": meta.get("layout"),
        "world_size": meta.get("world_size"), "versions": meta.get("versions"), "source": meta.get("source", "training"),
        "layer_kinds": cfg.model.layer_kinds(), "parameters": total,
        "format_version": meta.get("version", 1),
        "tensors": {k: {"shape": list(shape), "dtype": str(tensors.dtype(k)).replace("torch.", "")}
                    for k, shape in tensors.shapes.items()},
        "optimizer_state": open_optimizer_tensors(ckpt, meta) is not None,
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{ckpt}\n  step {info['step']}, saved from layout {info['saved_from_layout']} "
              f"(world {info['world_size']}), source: {info['source']}")
        print(f"  layers: {', '.join(info['layer_kinds'])}")
        print(f"  {total:,} parameters in {len(tensors)} tensors; optimizer state: {'yes' if info['optimizer_state'] else 'no'}")
        for name, t in info["tensors"].items():
            print(f"    {name:60s} {str(tuple(t['shape'])):>20s} {t['dtype']}")
    return info


def checkpoints_under(path: Path) -> list[Path]:
    """The checkpoints ``verify`` checks: ``path`` itself when it is one (it holds meta.json or is named step_<N>),
    else every ``step_<N>`` and unfinished ``.tmp_step_<N>`` under ``path/checkpoints`` (a run) or ``path``, by step."""
    if (path / "meta.json").is_file() or step_of(path) is not None:
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = [p for p in root.iterdir() if p.is_dir() and (step_of(p) is not None or p.name.startswith(".tmp_step_"))]
    return sorted(found, key=lambda p: (int(p.name.rsplit("_", 1)[1]), p.name.startswith(".")))


def verify(args) -> dict:
    """Every file of every checkpoint under ``--input`` against the size and xxh3-64 checksum meta.json recorded,
    hashed by ``--workers`` processes with a progress bar (bytes); prints one line per checkpoint (ok, damaged
    with each file, incomplete) and returns {checkpoint: "ok" | "ok, not verifiable" | "damaged" | "incomplete"}."""
    path = Path(args.input)
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is not a directory; give a run directory or a checkpoints/step_N directory")
    ckpts = checkpoints_under(path)
    if not ckpts:
        raise CheckpointError(f"'{path}' holds no checkpoints (no step_N directories under it or its checkpoints/)")
    status, problems, jobs = {}, {}, []
    for ck in ckpts:
        problems[ck] = []
        if not (ck / "meta.json").is_file():
            status[ck] = "incomplete"
            continue
        try:
            meta = read_manifest(ck)
        except CheckpointError as err:
            status[ck], problems[ck] = "damaged", [str(err)]
            continue
        sums = Checksums(ck, meta, notice=False)
        status[ck] = "ok" if sums.recorded else "ok, not verifiable"
        jobs += [(ck, rel, size, sums.files.get(rel)) for rel, size in sorted(meta.get("files", {}).items())]
    workers = args.workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(max(1, min(workers, len(jobs)))) as pool, \
            tqdm(total=sum(j[2] or 0 for j in jobs), unit="B", unit_scale=True, desc="verify", disable=None) as bar:
        futures = {pool.submit(file_problem, *job): job for job in jobs}
        for fut in as_completed(futures):
            ck, rel, size, _ = futures[fut]
            bar.update(size or 0)
            if (text := fut.result()) is not None:
                problems[ck].append(text)
    for ck in ckpts:
        if problems[ck] and status[ck] != "incomplete":
            status[ck] = "damaged"
        line = {"incomplete": "incomplete: no meta.json (a save that did not finish)",
                "damaged": "damaged: " + "; ".join(sorted(p.replace(f"'{ck}/", "'") for p in problems[ck])),
                "ok, not verifiable": "ok, not verifiable: written without checksums (sizes checked)"}.get(
            status[ck], f"ok ({sum(1 for j in jobs if j[0] == ck)} files)")
        print(f"{ck.name}: {line}", flush=True)
    return {str(ck): s for ck, s in status.items()}


def main(argv: list[str] | None = None):
    """The command line; ``argv`` given (tests, tools): errors are raised, not printed with exit status 2."""
    quiet_third_party()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("consolidate", consolidate), ("export-hf", export_hf), ("import-hf", import_hf),
                     ("upcycle", upcycle), ("inspect", inspect), ("verify", verify)):
        p = sub.add_parser(name)
        p.add_argument("--input", required=True)
        if name not in ("inspect", "verify"):
            p.add_argument("--output", required=True)
        p.set_defaults(fn=fn)
        if name in ("import-hf", "export-hf"):
            p.add_argument("--force", action="store_true", help="replace an existing output directory")
        if name == "import-hf":
            p.add_argument("--drop-mtp", action="store_true",
                           help="leave the checkpoint's multi-token-prediction layers out (DeepSeek-V3's are kept "
                                "by default; ERNIE 4.5's, which sparselm does not carry, are refused without it)")
        if name == "export-hf":
            p.add_argument("--fused-experts", action="store_true",
                           help="transformers 5's in-memory expert names (mlp.experts.gate_up_proj) instead of one per expert")
            p.add_argument("--family", default=None,
                           help="the family to write (default: the one the model was imported from, model.hf_family, "
                                "else the first that computes it)")
        if name in ("import-hf", "export-hf"):
            p.add_argument("--max-shard-gb", type=float, default=0.5, help="largest output file (and memory held), GiB")
        if name == "consolidate":
            p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
            p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output file (and memory held), GiB")
        if name == "upcycle":
            p.add_argument("--experts", type=int, required=True)
            p.add_argument("--top-k", type=int, default=2)
            p.add_argument("--every", type=int, default=1, help="upcycle every M-th layer (1 = all)")
            p.add_argument("--seed", type=int, default=0)
        if name == "inspect":
            p.add_argument("--json", action="store_true")
        if name == "verify":
            p.add_argument("--workers", type=int, default=0, help="processes hashing files (0: one per usable core)")
    args = parser.parse_args(argv)
    try:
        result = args.fn(args)
        if args.command == "verify" and argv is None and any(not s.startswith("ok") for s in result.values()):
            sys.exit(1)
        return result
    except (CheckpointError, ConversionError) as err:
        if argv is not None:
            raise
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
