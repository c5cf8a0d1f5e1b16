#!/usr/bin/env python
"""Checkpoint conversions (each goes through sparselm's layout-free checkpoint form).

  consolidate  --input CKPT_OR_RUN --output DIR [--dtype bf16] [--max-shard-gb G]   whole tensors in HF-style shards
  export-hf    --input CKPT_OR_RUN --output DIR [--fused-experts] [--force]   the family computing the model
  import-hf    --input HF_DIR      --output DIR [--force]        llama, mistral, mixtral, qwen2, qwen3, qwen2_moe,
                                                                 qwen3_moe, olmoe, glm4_moe (streamed)
  upcycle      --input CKPT_OR_RUN --output DIR --experts N [--top-k K] [--every M]
  inspect      --input CKPT_OR_RUN [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparselm.checkpoint.checkpointing import (CheckpointError, open_model_tensors, open_optimizer_tensors, read_config, read_meta,
                                 resolve_checkpoint)
from sparselm.convert.store import ConversionError, write_model_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load(path: str):
    """(checkpoint dir, meta, config, model tensors read on demand) of any checkpoint format."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
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
        return {"tokenizer.json": own}
    tok = cfg.data.tokenizer
    return {"tokenizer.json": Path(tok)} if tok != "byte" and Path(tok).is_file() else {}


def _write_hf_tokenizer(tokenizer, cfg, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json that ``AutoTokenizer.from_pretrained`` loads and that encode as
    sparselm does, for the byte tokenizer too."""
    from sparselm.data.tokenizer import eod_token, tokenizer_json

    (out / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
    eos = eod_token(tokenizer)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos, "bos_token": None,
        "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False}, indent=1))


def export_hf(args) -> Path:
    """The Hugging Face family that computes the model (``hf_export.choose_family``), streamed into sharded
    safetensors with an index (one output shard in memory at a time), config.json, generation_config.json and
    the tokenizer files."""
    import math

    from sparselm.checkpoint.checkpointing import load_tokenizer
    from sparselm.checkpoint.shards import write_consolidated
    from sparselm.convert.hf_export import choose_family, expert_slice, generation_config, hf_config, hf_tensor_plan

    ckpt, meta, cfg, tensors = _load(args.input)
    family = choose_family(cfg)
    tokenizer = load_tokenizer(ckpt)
    plan = hf_tensor_plan(family, cfg, tensors.keys(), args.fused_experts)
    config = hf_config(family, cfg, tokenizer.eod_id)
    missing = sorted({ours for ours, _ in plan.values()} - set(tensors.keys()))
    if missing:
        raise ConversionError(f"'{ckpt}' lacks tensors the {family} export needs: {', '.join(missing[:5])}")
    out = Path(args.output)
    _clear_output(args)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory '{out}' exists and is not empty; choose a new --output or pass --force")
    dtype = tensors.dtype("embed.weight")
    config["dtype"] = str(dtype).replace("torch.", "")

    def shape(name):
        ours, how = plan[name]
        full = tensors.shapes[ours]
        if how == "copy":
            return full
        return full[1:] if how[0] == "down" else (full[1] // 2, full[2])

    cache: dict = {}

    def get(name):
        ours, how = plan[name]
        if ours not in cache:
            if len(cache) >= 2:  # gate_up and down of the layer being written
                cache.pop(next(iter(cache)))
            cache[ours] = tensors[ours]
        return cache[ours] if how == "copy" else expert_slice(cache[ours], how)

    names = list(plan)
    nbytes = {n: math.prod(shape(n)) * tensors.dtype(plan[n][0]).itemsize for n in names}
    out.mkdir(parents=True, exist_ok=True)
    write_consolidated(names, nbytes, get, out, int(args.max_shard_gb * 2**30))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(generation_config(tokenizer.eod_id), indent=1))
    _write_hf_tokenizer(tokenizer, cfg, out)
    print(f"wrote {out} ({config['architectures'][0]}, {len(names)} tensors"
          f"{', fused experts' if args.fused_experts else ''})")
    return out


def import_hf(args) -> Path:
    """A Hugging Face model directory of a supported family, streamed tensor by tensor (``hf_import``)."""
    from sparselm.checkpoint.checkpointing import expected_shapes
    from sparselm.config import load_config
    from sparselm.convert.hf_families import sparselm_config
    from sparselm.convert.hf_import import open_hf_model, read_config
    from sparselm.model import build_model
    from sparselm.parallel.materialize import tied_aliases

    hf_dir = Path(args.input)
    if not hf_dir.is_dir():
        raise ConversionError(f"'{hf_dir}' is not a directory; give a local Hugging Face model directory")
    hf = read_config(hf_dir)
    overrides = sparselm_config(hf)
    overrides["data"] = {"seq_len": min(2048, overrides["model"]["max_seq_len"])}
    tok = hf_dir / "tokenizer.json"
    if tok.is_file():
        overrides["data"]["tokenizer"] = str(Path(args.output).resolve() / "tokenizer.json")
    cfg = load_config(None, overrides)
    model = build_model(cfg, device="meta")
    tied = set(tied_aliases(model))
    expected = {k: v for k, v in expected_shapes(model).items() if k not in tied}
    tensors = open_hf_model(hf_dir, expected, hf, cfg.model.layer_kinds())
    extra = {name: hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()}
    _clear_output(args)
    out = write_model_checkpoint(args.output, tensors, cfg, source=f"import-hf {hf_dir} ({hf['model_type']})",
                                 extra_files=extra, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out} ({hf['model_type']}, {len(tensors)} tensors; train from it with --train.resume={out})")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _clear_output(args) -> None:
    """--force: remove an existing output directory (after every check passed); without it the writers refuse."""
    out = Path(args.output)
    if getattr(args, "force", False) and out.exists():
        import shutil

        shutil.rmtree(out)


def upcycle(args) -> Path:
    from sparselm.convert.upcycle import upcycle as do_upcycle

    ckpt, meta, cfg, tensors = _load(args.input)
    new_tensors, new_cfg = do_upcycle(tensors, cfg, experts=args.experts, top_k=args.top_k, every=args.every, seed=args.seed)
    out = write_model_checkpoint(args.output, new_tensors, new_cfg, source=f"upcycle {ckpt}", extra_files=_tokenizer_file(ckpt, cfg))
    print(f"wrote {out}: {args.experts} experts, top-{args.top_k}, every {args.every} layer(s)")
    return out


def inspect(args) -> dict:
    import math

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


def main(argv: list[str] | None = None):
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("consolidate", consolidate), ("export-hf", export_hf), ("import-hf", import_hf),
                     ("upcycle", upcycle), ("inspect", inspect)):
        p = sub.add_parser(name)
        p.add_argument("--input", required=True)
        if name != "inspect":
            p.add_argument("--output", required=True)
        p.set_defaults(fn=fn)
        if name in ("import-hf", "export-hf"):
            p.add_argument("--force", action="store_true", help="replace an existing output directory")
        if name == "export-hf":
            p.add_argument("--fused-experts", action="store_true",
                           help="transformers 5's in-memory expert names (mlp.experts.gate_up_proj) instead of one per expert")
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
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, ConversionError) as err:
        if argv is not None:
            raise
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
