"""Rotary settings between a Hugging Face config.json and sparselm's ``model.rope_*`` keys, both ways.

Family-independent: every supported family reads them the same way (transformers 5's
``modeling_rope_utils``: ``rope_parameters``, or the 4.x ``rope_scaling``).
"""
from __future__ import annotations

import math

from sparselm.convert.refusal import unsupported
from sparselm.errors import ConversionError

SCALINGS = ("linear", "llama3", "yarn")


def hf_rope(hf: dict) -> dict:
    """The rotary settings of a Hugging Face config, read with transformers' precedence: a non-empty
    ``rope_scaling`` (the 4.x spelling) replaces ``rope_parameters``; theta and partial_rotary_factor come from
    that dict, else from the top level.  Returns the dict with 'rope_type', 'rope_theta', 'partial_rotary_factor'
    and '_key' (where the settings came from).  Raises ConversionError when that entry is not a dict."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"config.json has {key}={params!r}, which is not a dict of rotary settings")
    out = dict(params)
    out["rope_type"] = params.get("rope_type", params.get("type", "default"))
    out["rope_theta"] = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    out["partial_rotary_factor"] = 1.0 if partial is None else float(partial)
    out["_key"] = key
    return out


def rope_overrides(hf: dict, problems: list[str]) -> dict:
    """sparselm ``model`` overrides (rope_theta, rotary_fraction, rope_scaling and its factors) of a config.json;
    appends to ``problems`` a clause for each setting sparselm does not compute (another rope_type, a missing
    original length)."""
    rope = hf_rope(hf)
    kind, key = rope["rope_type"], rope["_key"]
    out = {"rope_theta": rope["rope_theta"], "rotary_fraction": rope["partial_rotary_factor"]}
    if kind == "default":
        return out
    if kind not in SCALINGS:
        problems.append(unsupported(f"{key}.rope_type", kind, "default, " + ", ".join(SCALINGS)))
        return out
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn"):  # transformers' standardize_rope_params: the top-level field wins, else max length
        original = hf.get("original_max_position_embeddings") or original or hf.get("max_position_embeddings")
    if kind == "yarn" and factor is None and original:
        factor = hf["max_position_embeddings"] / original
    out.update(rope_scaling=kind, rope_factor=float(factor if factor is not None else 1.0))
    if kind in ("llama3", "yarn"):
        if not original:
            problems.append(unsupported(f"{key}.original_max_position_embeddings", original, "a positive length"))
        out["rope_original_max_seq_len"] = int(original or 0)
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"]))
    if kind == "yarn":
        f = out["rope_factor"]
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attention = rope.get("attention_factor")
        if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            attention = mscale(f, rope["mscale"]) / mscale(f, rope["mscale_all_dim"])
        out.update(rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                   rope_attention_factor=float(attention if attention is not None else mscale(f)),
                   rope_truncate=bool(rope.get("truncate", True)))
    return out


def rope_parameters(m) -> dict:
    """config.json ``rope_parameters`` (transformers 5 keys) of sparselm's ``cfg.model`` ``m``."""
    rope = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        rope["factor"] = m.rope_factor
    if m.rope_scaling in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = m.rope_original_max_seq_len
    if m.rope_scaling == "llama3":
        rope.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor)
    if m.rope_scaling == "yarn":
        rope.update(beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow, truncate=m.rope_truncate,
                    attention_factor=m.rope_attention_factor or None)
    if m.rotary_fraction != 1:
        rope["partial_rotary_factor"] = m.rotary_fraction
    return rope
