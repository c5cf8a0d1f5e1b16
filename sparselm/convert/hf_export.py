"""export-hf: a sparselm model -> the Hugging Face family that computes the same function.

The family is chosen by ``hf_export_config.choose_family``; ``open_hf_view`` reads the checkpoint as that
family's tensors (a ``MappedTensors`` over the checkpoint's reader), streamed into sharded safetensors.  Routed
experts are written one tensor per expert, as published checkpoints and ``save_pretrained`` hold them
(Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, the others ``mlp.experts.{e}.gate_proj/...``), or, with
``fused=True``, under transformers 5's in-memory names (``mlp.experts.gate_up_proj``).
"""
from __future__ import annotations

import json
from pathlib import Path

from sparselm.checkpoint.checkpointing import (
    load_tokenizer,
    open_model_tensors,
    read_config,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from sparselm.checkpoint.shards import write_consolidated
from sparselm.checkpoint.tensors import CanonicalTensors
from sparselm.convert.experts import PARTS
from sparselm.convert.hf_export_config import choose_family, generation_config, hf_config
from sparselm.convert.hf_family import Family
from sparselm.convert.hf_names import (
    GLOBAL,
    GPT_OSS_EXPERTS,
    MTP_COPIES,
    expert_name,
    gpt_oss_expert_names,
    layer_renames,
    mtp_renames,
    mtp_stacked_name,
    stacked_name,
)
from sparselm.convert.mapped import MappedTensors, Piece, Recipe
from sparselm.convert.store import clear_output
from sparselm.data.tokenizer import eod_token, tokenizer_json
from sparselm.errors import ConversionError


def hf_tensor_plan(fam: Family, cfg, names, fused: bool) -> dict[str, Recipe]:
    """Hugging Face name -> how it is read from our tensors: a copy, or a split of one expert's part out of our
    stacked tensors (``fused``: transformers 5's stacked tensors, copied).  Only names in ``names`` (the
    checkpoint's tensors) are planned; a tied output projection is not written."""
    m = cfg.model
    plan = {}
    ours_present = set(names)
    for ours, theirs in GLOBAL.items():
        if ours in ours_present and not (ours == "head.proj.weight" and m.tie_embeddings):
            plan[theirs] = Recipe("copy", (Piece(ours),))
    for i, kind in enumerate(m.layer_kinds()):
        for ours, theirs in layer_renames(fam, i, kind, fused).items():
            if ours in ours_present:
                one_row = fam.statics_bias and ours.endswith(".router.expert_bias")  # [E] -> [1, E]
                plan[theirs] = Recipe("transform", (Piece(ours),), "one_row_out") if one_row else \
                    Recipe("copy", (Piece(ours),))
        if kind != "moe":
            continue
        if fam.expert_layout == "gpt_oss":  # one layout only, whatever ``fused`` says
            for ours, theirs in gpt_oss_expert_names(i).items():
                stem = GPT_OSS_EXPERTS[ours.rsplit(".", 1)[1]]
                plan[theirs] = (Recipe("copy", (Piece(ours),)) if stem is None
                                else Recipe("transform", (Piece(ours),), f"{stem}_out"))
            continue
        if fused:
            for part in ("gate", "down"):
                plan[stacked_name(i, part, fused_hf=True)] = Recipe("copy", (Piece(stacked_name(i, part)),))
            continue
        for e in range(cfg.moe.num_experts):
            for part in PARTS:
                plan[expert_name(fam, i, e, part)] = Recipe("split", (Piece(stacked_name(i, part), part, e),))
    plan.update(mtp_plan(fam, cfg, ours_present, fused))
    return plan


def mtp_plan(fam: Family, cfg, ours_present: set, fused: bool) -> dict[str, Recipe]:
    """The multi-token-prediction depths as the layers after the decoder layers (``hf_names.mtp_renames``), with
    the copies of the embedding and output head DeepSeek-V3's checkpoints carry in each."""
    m, plan = cfg.model, {}
    n, kind = m.n_layers, m.layer_kinds()[-1]
    for k in range(m.mtp_layers):
        for ours, theirs in mtp_renames(fam, n, k, kind, fused).items():
            if ours in ours_present:
                plan[theirs] = Recipe("copy", (Piece(ours),))
        head = "embed.weight" if m.tie_embeddings else "head.proj.weight"
        for ours, theirs in (("embed.weight", MTP_COPIES["embed.weight"]), (head, MTP_COPIES["head.proj.weight"])):
            plan[f"model.layers.{n + k}.{theirs}"] = Recipe("copy", (Piece(ours),))
        if kind != "moe":
            continue
        for part in (("gate", "down") if fused else PARTS):
            if fused:
                plan[stacked_name(n + k, part, fused_hf=True)] = Recipe("copy", (Piece(mtp_stacked_name(k, part)),))
                continue
            for e in range(cfg.moe.num_experts):
                plan[expert_name(fam, n + k, e, part)] = Recipe("split", (Piece(mtp_stacked_name(k, part), part, e),))
    return plan


def open_hf_view(tensors: CanonicalTensors, fam: Family, cfg, fused: bool, source: Path) -> MappedTensors:
    """Our checkpoint's ``tensors`` as family ``fam``'s, read when written; ConversionError naming what the
    checkpoint at ``source`` lacks."""
    plan = hf_tensor_plan(fam, cfg, tensors.keys(), fused)
    missing = sorted({p.source for r in plan.values() for p in r.pieces} - set(tensors.keys()))
    if missing:
        raise ConversionError(f"'{source}' lacks tensors the {fam.name} export needs: {', '.join(missing[:5])}")
    return MappedTensors(tensors, plan)


def write_hf_tokenizer(tokenizer, cfg, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json that ``AutoTokenizer.from_pretrained`` loads and that encode as
    sparselm does, for the byte tokenizer too."""
    (out / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
    eos = eod_token(tokenizer)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos, "bos_token": None,
        "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False}, indent=1))


def export_hf(path: str | Path, output: str | Path, fused: bool, max_shard_bytes: int, force: bool = False,
              family: str | None = None) -> Path:
    """The ``export-hf`` command: the checkpoint (or run directory's latest) at ``path`` as the Hugging Face
    family that computes it, streamed into sharded safetensors of at most ``max_shard_bytes`` with an index
    (one shard in memory at a time), config.json, generation_config.json and the tokenizer files under
    ``output``; ``force`` replaces an existing ``output``; ``family`` names the family to write (default
    ``choose_family``'s: the imported one, else the first that computes the model).  Raises ConversionError (no
    family, missing tensors, non-empty output) and CheckpointError before writing."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    verify_checkpoint(ckpt)
    cfg, tensors = read_config(ckpt), open_model_tensors(ckpt, meta)
    fam = choose_family(cfg, family)
    if family is None and cfg.model.hf_family and fam.name != cfg.model.hf_family:
        print(f"model.hf_family={cfg.model.hf_family} (where it was imported from) cannot express this model any more; "
              f"writing {fam.name}, the first family that can")
    tokenizer = load_tokenizer(ckpt)
    view = open_hf_view(tensors, fam, cfg, fused, ckpt)
    config = hf_config(fam, cfg, tokenizer.eod_id)
    out = Path(output)
    clear_output(out, force)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory '{out}' exists and is not empty; choose a new --output or pass --force")
    config["dtype"] = str(tensors.dtype("embed.weight")).replace("torch.", "")
    names = list(view.keys())
    out.mkdir(parents=True, exist_ok=True)
    write_consolidated(names, {n: view.nbytes(n) for n in names}, view.__getitem__, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(generation_config(tokenizer.eod_id), indent=1))
    write_hf_tokenizer(tokenizer, cfg, out)
    print(f"wrote {out} ({config['architectures'][0]}, {len(names)} tensors{', fused experts' if fused else ''})")
    return out
