"""Rotary settings between a Hugging Face config.json and sparselm's ``model.rope`` section, both ways.

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
    """sparselm ``model`` overrides (rotary_fraction and the ``rope`` section: theta, scaling and its factors) of a
    config.json; appends to ``problems`` a clause for each setting sparselm does not compute (another rope_type, a missing
    original length)."""
    rope = hf_rope(hf)
    kind, key = rope["rope_type"], rope["_key"]
    section = {"theta": rope["rope_theta"]}
    out = {"rotary_fraction": rope["partial_rotary_factor"], "rope": section}
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
    section.update(scaling=kind, factor=float(factor if factor is not None else 1.0))
    if kind in ("llama3", "yarn"):
        if not original:
            problems.append(unsupported(f"{key}.original_max_position_embeddings", original, "a positive length"))
        section["original_max_seq_len"] = int(original or 0)
    if kind == "llama3":
        section.update(low_freq_factor=float(rope["low_freq_factor"]), high_freq_factor=float(rope["high_freq_factor"]))
    if kind == "yarn":
        f = section["factor"]
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attention = rope.get("attention_factor")
        if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            attention = mscale(f, rope["mscale"]) / mscale(f, rope["mscale_all_dim"])
        section.update(beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                       attention_factor=float(attention if attention is not None else mscale(f)),
                       truncate=bool(rope.get("truncate", True)))
    return out


def rope_parameters(m) -> dict:
    """config.json ``rope_parameters`` (transformers 5 keys) of sparselm's ``cfg.model`` ``m``."""
    rope = {"rope_type": "default" if m.rope.scaling == "none" else m.rope.scaling, "rope_theta": m.rope.theta}
    if m.rope.scaling != "none":
        rope["factor"] = m.rope.factor
    if m.rope.scaling in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = m.rope.original_max_seq_len
    if m.rope.scaling == "llama3":
        rope.update(low_freq_factor=m.rope.low_freq_factor, high_freq_factor=m.rope.high_freq_factor)
    if m.rope.scaling == "yarn":
        rope.update(beta_fast=m.rope.beta_fast, beta_slow=m.rope.beta_slow, truncate=m.rope.truncate,
                    attention_factor=m.rope.attention_factor or None)
    # always written: a family's default may differ from 1 (GLM-4-MoE's is 0.5)
    rope["partial_rotary_factor"] = m.rotary_fraction
    return rope
