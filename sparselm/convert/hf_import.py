"""import-hf: a Hugging Face model directory of a supported family -> a sparselm checkpoint, streamed.

The source is read tensor by tensor through ``SafetensorsDir`` (safetensors' memory map), in whatever dtype it
is stored (bf16, fp16, fp32 are kept as they are); routed experts stored one tensor per expert (as published
checkpoints and ``save_pretrained`` hold them) or fused (transformers 5's in-memory names) become sparselm's
stacked ``[E, 2H, D]`` / ``[E, D, H]`` tensors (``experts``).  ``open_hf_model`` gives a ``MappedTensors``
view that ``write_model_checkpoint`` streams, so peak memory is about one output shard (``max_shard_bytes``),
not the model.  Every check (config, files present and complete, each tensor found with the right shape, no
tensor left unread, no quantized dtype) runs before anything is written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from sparselm.checkpoint.checkpointing import expected_shapes
from sparselm.config import load_config
from sparselm.convert.experts import PARTS, STACKED
from sparselm.convert.hf_families import family as family_of
from sparselm.convert.hf_family import Family
from sparselm.convert.hf_fp8 import DequantizedFP8
from sparselm.convert.hf_import_config import is_block_fp8, sparselm_config, with_defaults
from sparselm.convert.hf_names import (
    GLOBAL,
    GPT_OSS_EXPERTS,
    MTP_COPIES,
    expert_name,
    gpt_oss_expert_names,
    layer_renames,
    mtp_renames,
    stacked_name,
)
from sparselm.convert.hf_safetensors import DTYPES, SafetensorsDir
from sparselm.convert.mapped import MappedTensors, Piece, Recipe
from sparselm.convert.store import clear_output, write_model_checkpoint
from sparselm.errors import ConversionError
from sparselm.model import build_model
from sparselm.parallel.materialize import tied_aliases

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""Files of a Hugging Face directory import-hf copies into the checkpoint when present."""


def read_config(hf_dir: Path) -> dict:
    """``hf_dir``/config.json as a dict; ConversionError when there is none."""
    config = Path(hf_dir) / "config.json"
    if not config.is_file():
        raise ConversionError(f"'{hf_dir}' has no config.json; give a Hugging Face model directory")
    return json.loads(config.read_text())


def expert_recipe(hf_dir: Path, src: SafetensorsDir, fam: Family, ours: str, experts: int, n_layers: int) -> Recipe:
    """How our stacked ``ours`` (``layers.{i}.ffn.experts.gate_up_proj`` / ``down_proj``, or a
    multi-token-prediction depth's ``mtp.{k}.block.ffn.experts.*``, stored as layer ``n_layers + k``) of
    ``experts`` experts is read: transformers 5's stacked tensor as is, or merged from the per-expert ones.  Each
    expert is checked whole (gate, up and down) where its first stacked tensor is planned."""
    i, stacked = int(ours.split(".")[1]) + (n_layers if ours.startswith("mtp.") else 0), ours.rsplit(".", 1)[1]
    parts = tuple(p for p in PARTS if STACKED[p] == stacked)
    fused = stacked_name(i, parts[0], fused_hf=True)
    if fused in src:
        return Recipe("copy", (Piece(fused),))
    checked = PARTS if parts[0] == PARTS[0] else parts
    for e in range(experts):
        for part in checked:
            name = expert_name(fam, i, e, part)
            if name not in src:
                raise ConversionError(f"'{hf_dir}' is missing tensor {name} (an expert of {ours})")
    return Recipe("merge", tuple(Piece(expert_name(fam, i, e, p), p, e) for e in range(experts) for p in parts))


def gpt_oss_expert_recipe(hf_dir: Path, src: SafetensorsDir, ours: str, theirs: str) -> Recipe:
    """How our ``ours`` is read from gpt-oss's ``theirs`` (``hf_names.gpt_oss_expert_names``): de-interleaved and
    transposed from the bf16 tensor, or dequantized from MXFP4 ``{theirs}_blocks`` / ``_scales``."""
    stem = GPT_OSS_EXPERTS[ours.rsplit(".", 1)[1]]
    if theirs in src:
        return Recipe("copy", (Piece(theirs),)) if stem is None else Recipe("transform", (Piece(theirs),), f"{stem}_in")
    blocks, scales = f"{theirs}_blocks", f"{theirs}_scales"
    if stem in ("gate_up", "down") and blocks in src and scales in src:
        return Recipe("transform", (Piece(blocks), Piece(scales)), f"{stem}_mxfp4_in")
    raise ConversionError(f"'{hf_dir}' is missing tensor {theirs} (or its MXFP4 {blocks} and {scales}) for {ours}")


def open_source(hf_dir: Path, hf: dict) -> SafetensorsDir | DequantizedFP8:
    """``hf_dir``'s tensors by Hugging Face name; block-scaled fp8 weights (``quantization_config``) read
    dequantized to bf16, one tensor at a time."""
    src = SafetensorsDir(hf_dir)
    quant = hf.get("quantization_config") or {}
    return DequantizedFP8(src, tuple(quant["weight_block_size"])) if is_block_fp8(quant) else src


def open_hf_model(hf_dir: Path, expected: dict[str, tuple], hf: dict, kinds: list[str],
                  drop_mtp: bool = False) -> MappedTensors:
    """The lazy reader of ``hf_dir`` (config.json ``hf``) as a sparselm model whose tensors have ``expected``
    shapes and whose layers are ``kinds`` (multi-token-prediction depths ``mtp.{k}.*`` read from the layers
    after them); raises ConversionError naming a missing tensor, a wrong shape, a quantized dtype or a tensor
    sparselm would drop (a family's own multi-token-prediction tensors, ``Family.mtp_tensors``, unless
    ``drop_mtp``).  On the result, ``skipped``: the tensors of layers after the decoder layers left out;
    ``dropped_mtp``: the family's own multi-token-prediction tensors left out."""
    fam = family_of(hf["model_type"])
    src = open_source(hf_dir, hf)
    for name, code in src.dtype_codes.items():
        if fam.mxfp4 and code == "U8" and name.endswith(("_blocks", "_scales")):
            continue  # MXFP4 experts, dequantized when read (gpt_oss_experts)
        if code not in DTYPES:
            raise ConversionError(f"tensor {name} has dtype {code} (quantized weights); supported: bf16, fp16, fp32, "
                                  "and fp8 e4m3 with block scales (quantization_config.weight_block_size)")
    mtp = sorted(k for k in src.file_of if fam.mtp_tensors and re.search(fam.mtp_tensors, k))
    if mtp and not drop_mtp:
        raise ConversionError(f"'{hf_dir}' holds {len(mtp)} multi-token-prediction tensors ({mtp[0]} ...) that "
                              f"sparselm does not carry for {fam.name}; import with --drop-mtp to leave them out")
    n = hf["num_hidden_layers"]
    one_to_one = dict(GLOBAL)
    for i, kind in enumerate(kinds):
        one_to_one.update(layer_renames(fam, i, kind, fused=stacked_name(i, "gate", fused_hf=True) in src))
    for i, kind in enumerate(kinds):
        if kind == "moe" and fam.expert_layout == "gpt_oss":
            one_to_one.update(gpt_oss_expert_names(i))
    depths = sorted({int(k.split(".")[1]) for k in expected if k.startswith("mtp.")})
    for k in depths:
        fused = stacked_name(n + k, "gate", fused_hf=True) in src
        one_to_one.update(mtp_renames(fam, n, k, kinds[-1], fused))
    recipes, used = {}, set()
    for ours, shape in expected.items():
        if fam.expert_layout == "gpt_oss" and ".ffn.experts." in ours and ours in one_to_one:
            recipe = gpt_oss_expert_recipe(hf_dir, src, ours, one_to_one[ours])
        elif ours in one_to_one:
            theirs = one_to_one[ours]
            if theirs not in src:
                raise ConversionError(f"'{hf_dir}' is missing tensor {theirs} (for {ours})")
            one_row = fam.statics_bias and ours.endswith(".router.expert_bias")  # [1, E] -> [E]
            recipe = Recipe("transform", (Piece(theirs),), "one_row_in") if one_row else \
                Recipe("copy", (Piece(theirs),))
        elif ours.endswith(tuple(f".experts.{s}" for s in set(STACKED.values()))):
            recipe = expert_recipe(hf_dir, src, fam, ours, shape[0], n)
        else:
            raise ConversionError(f"'{hf_dir}': no {fam.name} tensor maps to sparselm's {ours}")
        used.update(p.source for p in recipe.pieces)
        got = recipe.shape(src)
        if tuple(got) != tuple(shape):
            raise ConversionError(f"'{hf_dir}': {ours} would have shape {tuple(got)}, the model {tuple(shape)}")
        recipes[ours] = recipe
    after = lambda k: k.startswith("model.layers.") and int(k.split(".")[2]) >= n  # noqa: E731
    copies = {f"model.layers.{n + k}.{theirs}" for k in depths for theirs in MTP_COPIES.values()}
    left = [k for k in src.file_of if k not in used and not k.endswith("rotary_emb.inv_freq") and k not in copies
            and not after(k) and k not in mtp
            and not (k == "lm_head.weight" and hf.get("tie_word_embeddings"))]
    if left:
        raise ConversionError(f"'{hf_dir}' has tensors sparselm has no place for (e.g. biases it does not compute): "
                              f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
    mapped = MappedTensors(src, recipes)
    mapped.skipped = sorted(k for k in src.file_of if after(k) and k not in used and k not in copies)
    mapped.dropped_mtp = mtp
    return mapped


def mtp_layers_to_import(hf_dir: Path, hf: dict, drop_mtp: bool) -> int:
    """Multi-token-prediction depths import keeps: those config.json names when the checkpoint holds them all,
    0 with ``drop_mtp`` or when it holds none (transformers' ``save_pretrained`` writes none: its model has
    none), each said in one line; ConversionError when it holds some of them only."""
    fam = family_of(hf["model_type"])
    named = sparselm_config_mtp(hf, fam)
    if not named:
        return 0
    n, keys = hf["num_hidden_layers"], SafetensorsDir(hf_dir).shapes
    held = [k for k in range(named) if f"model.layers.{n + k}.eh_proj.weight" in keys]
    if drop_mtp:
        print(f"dropping the {len(held)} multi-token-prediction layer(s) of '{hf_dir}' (--drop-mtp)")
        return 0
    if not held:
        print(f"config.json names {named} multi-token-prediction layer(s) ({fam.mtp_key}) but '{hf_dir}' holds none "
              "(as transformers' save_pretrained writes it): imported without; add new ones with --model.mtp_layers")
        return 0
    if len(held) != named:
        raise ConversionError(f"'{hf_dir}' holds multi-token-prediction layer(s) {[n + k for k in held]} of the "
                              f"{named} {fam.mtp_key} names; give a complete checkpoint or import with --drop-mtp")
    return named


def sparselm_config_mtp(hf: dict, fam: Family) -> int:
    """The multi-token-prediction depths ``hf`` names (0 for a family without them)."""
    return int(hf.get(fam.mtp_key, hf.get("num_mtp_layers", 0)) or 0) if fam.mtp_key else 0


def import_hf(hf_dir: str | Path, output: str | Path, max_shard_bytes: int, force: bool = False,
              drop_mtp: bool = False) -> Path:
    """The ``import-hf`` command: the Hugging Face model directory ``hf_dir`` of a supported family, streamed
    tensor by tensor into a sparselm checkpoint at ``output`` (shards of at most ``max_shard_bytes``) with its
    tokenizer files; ``force`` replaces an existing ``output`` once every check passed; ``drop_mtp`` leaves its
    multi-token-prediction layers out (kept otherwise).  Raises ConversionError, before writing, for input it
    cannot convert exactly."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"'{hf_dir}' is not a directory; give a local Hugging Face model directory")
    hf = with_defaults(read_config(hf_dir))
    overrides = sparselm_config(hf)
    if "mtp_layers" in overrides["model"]:
        overrides["model"]["mtp_layers"] = mtp_layers_to_import(hf_dir, hf, drop_mtp)
    overrides["data"] = {"seq_len": min(2048, overrides["model"]["max_seq_len"])}
    tok = hf_dir / "tokenizer.json"
    if tok.is_file():
        overrides["data"]["tokenizer"] = str(Path(output).resolve() / "tokenizer.json")
    cfg = load_config(None, overrides)
    model = build_model(cfg, device="meta")
    tied = set(tied_aliases(model))
    expected = {k: v for k, v in expected_shapes(model).items() if k not in tied}
    tensors = open_hf_model(hf_dir, expected, hf, cfg.model.layer_kinds(), drop_mtp)
    if tensors.dropped_mtp:
        print(f"dropping the {len(tensors.dropped_mtp)} multi-token-prediction tensors of '{hf_dir}' (--drop-mtp): "
              f"{tensors.dropped_mtp[0]} ...")
    if tensors.skipped:
        print(f"left out {len(tensors.skipped)} tensors of the layers after the {hf['num_hidden_layers']} decoder layers "
              f"(multi-token prediction sparselm does not carry for {hf['model_type']}): {tensors.skipped[0]} ...")
    extra = {name: hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()}
    clear_output(output, force)
    out = write_model_checkpoint(output, tensors, cfg, source=f"import-hf {hf_dir} ({hf['model_type']})",
                                 extra_files=extra, max_shard_bytes=max_shard_bytes)
    print(f"wrote {out} ({hf['model_type']}, {len(tensors)} tensors; train from it with --train.resume={out})")
    return out
