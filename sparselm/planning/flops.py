"""Compute accounting from a resolved config, analytically: parameter counts and training FLOPs per token.

Parameters (``param_counts``): total (shared tensors once), active per token (MoE: router, shared experts
and top_k routed experts; PKM: everything but the value rows a token does not read), Kaplan's N
(non-embedding: without the input embedding and the output projection, i.e. the vocabulary matrices) and
its active version, and the same per block kind.  They equal ``SparseLM.num_params()`` /
``num_params(active=True)`` of the built model (tests/unit/planning/test_flops.py checks it on the meta device).

FLOPs (``flop_counts``) are model FLOPs of one training token: forward + backward matmul work, a
multiply-add counted as 2, the backward of a matmul twice its forward (one product for the input
gradient, one for the weight gradient), so every matmul costs 3x its forward (6 FLOPs per weight per
token, Kaplan's C = 6N).  By layer kind:

- attention: q/k/v/o projections; the core (scores and weighted values, 4 * d_model FLOPs per visible key
  forward) at the density of the attention pattern, averaged over the positions of a data.seq_len
  sequence (causal: (T + 1) / 2 keys per query), plus the persistent memory slots of all-attention blocks;
- dense feed-forward: SwiGLU; MoE: router (and its noise projection), shared experts, top_k routed experts
  (dropless: drop_tokens=true makes this an upper bound);
- PKM: query projection, sub-key scoring (both halves against sqrt(n_keys) sub-keys, every head), the
  top-k selection (comparisons and candidate sums, forward only: no gradient flows through it, and these
  are the only non-matmul operations counted), the weighted value read (knn rows per head) and the
  Memory+ gate/output projections;
- every kind's formulas are its cost model, registered with it (``sparselm.model.cost``,
  ``sparselm.model.registry.block_cost``); a kind without one is refused by name;
- output projection (logits); each multi-token-prediction depth: its block, eh_proj and the output
  projection.  The embedding lookup, norms, rotary, activations, softmaxes and the loss are elementwise
  and not counted (as Kaplan, Megatron and PaLM's MFU do not).

Recomputation (activation checkpointing, ``parallel.recompute``) is not in ``per_token``: ``mfu`` is model-FLOPs
utilisation.  ``recompute_per_token`` reports it apart: the forward FLOPs of the recomputed blocks (full), or of
their counted non-matmul parts (selective keeps the matmul outputs: the attention core and PKM's top-k).
``attention="executed_dense"`` counts the attention core instead as the masked dense SDPA of the CPU
reference path executes it (every query against every context key and memory slot; memory queries
double the score width, see sparse_attention.kernels.append_memory): what FlopCounterMode measures.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from sparselm.errors import ConfigError
from sparselm.model.recompute import recomputed_layers
from sparselm.model.registry import block_cost
from sparselm.model.sparse_attention.patterns import PatternSpec, materialize, pattern_mask_mod

__all__ = ["ParamCounts", "FlopCounts", "param_counts", "flop_counts", "mean_visible_keys", "peak_tflops",
           "device_peak_tflops", "summary_lines", "PEAK_TFLOPS"]

TRAIN_MULTIPLIER = 3
"""Forward + backward of a matmul: the forward product plus the input- and weight-gradient products."""


@dataclass
class ParamCounts:
    total: int
    """Every parameter once (tied or shared tensors once)."""
    active: int
    """Parameters one token uses."""
    embedding: int
    """Input embedding plus output projection (once when tied)."""
    non_embedding: int
    """Kaplan's N: total without the vocabulary matrices."""
    non_embedding_active: int
    """Active parameters without the vocabulary matrices (N_active)."""
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    """Block kind -> {layers, total, active} summed over the blocks of that kind (attention, norms, slot)."""


@dataclass
class FlopCounts:
    per_token: float
    """Training FLOPs (forward + backward) per token."""
    forward_per_token: float
    """Forward FLOPs per token."""
    by_component: dict[str, float] = field(default_factory=dict)
    """Training FLOPs per token by component, summed over layers (attention_proj, attention_core, ffn,
    moe_router, moe_shared, moe_experts, pkm_query, pkm_subkeys, pkm_topk, pkm_values, pkm_proj, lm_head;
    mtp: the multi-token-prediction depths)."""
    by_kind: dict[str, float] = field(default_factory=dict)
    """Training FLOPs per token of the blocks of each kind (the lm_head under 'head')."""
    seq_len: int = 0
    """Sequence length the attention term was averaged over."""
    recompute_per_token: float = 0.0
    """FLOPs per token that parallel.recompute repeats in backward (hardware FLOPs, not model FLOPs)."""


def _check_resolved(cfg) -> None:
    if cfg.model.vocab_size <= 0:
        raise ConfigError("sparselm.planning.flops needs a resolved model.vocab_size (the trainer sets it from the "
                          "tokenizer; read the run's config.yaml or call sparselm.data.vocab.derive_vocab_size first)")


# ------------------------------------------------------------------------------------------- attention
@lru_cache(maxsize=64)
def _visible_keys(spec, seq_len: int) -> float:
    mod = pattern_mask_mod(spec, seq_len, "cpu")
    total, chunk = 0, max(1, (1 << 22) // seq_len)  # rows per chunk: at most 4M mask entries at a time
    for start in range(0, seq_len, chunk):
        rows = min(chunk, seq_len - start)
        total += int(materialize(mod, rows, seq_len, torch.device("cpu"), q_start=start).sum())
    return total / seq_len


def mean_visible_keys(cfg, seq_len: int | None = None) -> float:
    """Context keys a query sees under attention.pattern, averaged over the positions of a sequence of
    ``seq_len`` (default data.seq_len) tokens; counted exactly from the pattern's mask (row by row)."""
    t = seq_len or cfg.data.seq_len
    if cfg.attention.pattern == "causal":
        return (t + 1) / 2
    return _visible_keys(PatternSpec.from_config(cfg.attention), t)


def _visible_context_keys(cfg, layer_idx: int, seq_len: int, mode: str) -> float:
    """Context keys a query of layer ``layer_idx`` sees on average ('pattern' mode; 0 for 'executed_dense',
    which counts every key): a sliding layer's window, else the attention pattern's."""
    if mode != "pattern":
        return 0.0
    t, window = seq_len or cfg.data.seq_len, cfg.model.layer_window(layer_idx)
    return (sum(min(q + 1, window) for q in range(t)) / t) if window else mean_visible_keys(cfg, seq_len)


def _blocks(cfg, seq_len: int, mode: str):
    """Per layer: (kind, total params, active params, forward FLOPs by component), from the kind's cost model
    (``sparselm.model.registry.block_cost``: a kind without one is refused, naming it)."""
    for i, kind in enumerate(cfg.model.layer_kinds()):
        cost = block_cost(kind)
        total, active = cost.params(cfg, i)
        yield kind, total, active, cost.forward_flops(cfg, i, _visible_context_keys(cfg, i, seq_len, mode), seq_len, mode)


def _mtp_blocks(cfg, seq_len: int, mode: str):
    """Per multi-token-prediction depth (model.mtp_layers): (total params, active params, forward FLOPs by
    component) of its block alone (the last layer's kind, layer index n_layers + k)."""
    m = cfg.model
    cost = block_cost(m.layer_kinds()[-1])
    for k in range(m.mtp_layers):
        i = m.n_layers + k
        yield (*cost.params(cfg, i), cost.forward_flops(cfg, i, _visible_context_keys(cfg, i, seq_len, mode), seq_len,
                                                         mode))


def _mtp_depths(cfg, seq_len: int, mode: str):
    """Per multi-token-prediction depth (model.mtp_layers): (total params, active params, forward FLOPs) of its
    block (the last layer's kind), its two input norms, ``eh_proj`` [d, 2d] and final norm, the FLOPs of the
    shared output projection it runs included."""
    m = cfg.model
    own = 2 * m.d_model * m.d_model + 3 * m.d_model
    for total, active, flops in _mtp_blocks(cfg, seq_len, mode):
        yield (total + own, active + own,
               sum(flops.values()) + 2 * 2 * m.d_model * m.d_model + 2 * m.vocab_size * m.d_model)


def param_counts(cfg) -> ParamCounts:
    """Parameter counts of the model ``cfg`` describes (model.vocab_size resolved)."""
    _check_resolved(cfg)
    m = cfg.model
    vocab = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    total = active = vocab + m.d_model  # embeddings and the final norm
    by_kind: dict[str, dict[str, int]] = {}
    for kind, t, a, _ in _blocks(cfg, cfg.data.seq_len, "pattern"):
        entry = by_kind.setdefault(kind, {"layers": 0, "total": 0, "active": 0})
        entry["layers"] += 1
        entry["total"] += t
        entry["active"] += a
        total += t
        active += a
    for t, a, _ in _mtp_depths(cfg, cfg.data.seq_len, "pattern"):
        entry = by_kind.setdefault("mtp", {"layers": 0, "total": 0, "active": 0})
        entry["layers"] += 1
        entry["total"] += t
        entry["active"] += a
        total += t
        active += a
    return ParamCounts(total=total, active=active, embedding=vocab, non_embedding=total - vocab,
                       non_embedding_active=active - vocab, by_kind=by_kind)


def flop_counts(cfg, seq_len: int | None = None, attention: str = "pattern") -> FlopCounts:
    """Training FLOPs per token of the model ``cfg`` describes, for sequences of ``seq_len`` tokens
    (default data.seq_len).  ``attention``: 'pattern' (model FLOPs: only the keys the pattern shows) or
    'executed_dense' (the dense masked SDPA of the CPU reference path, as FlopCounterMode counts it)."""
    _check_resolved(cfg)
    t = seq_len or cfg.data.seq_len
    by_component: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    recompute = _recomputed_forward(cfg, t, attention)
    for kind, _, _, flops in _blocks(cfg, t, attention):
        for name, fwd in flops.items():
            train = fwd * (1 if name == "pkm_topk" else TRAIN_MULTIPLIER)
            by_component[name] = by_component.get(name, 0.0) + train
            by_kind[kind] = by_kind.get(kind, 0.0) + train
    head = TRAIN_MULTIPLIER * 2 * cfg.model.vocab_size * cfg.model.d_model
    by_component["lm_head"] = by_kind["head"] = float(head)
    for _, _, fwd in _mtp_depths(cfg, t, attention):  # multi-token prediction: block, projection, shared head
        by_component["mtp"] = by_kind["mtp"] = by_component.get("mtp", 0.0) + TRAIN_MULTIPLIER * fwd
    fwd = sum(v / (1 if k == "pkm_topk" else TRAIN_MULTIPLIER) for k, v in by_component.items())
    return FlopCounts(per_token=sum(by_component.values()), forward_per_token=fwd, by_component=by_component,
                      by_kind=by_kind, seq_len=t, recompute_per_token=recompute)


SELECTIVE_RECOMPUTES = ("attention_core", "pkm_topk")
"""Counted components that are not weight matmuls: what selective recomputation runs again."""


def _recomputed_forward(cfg, seq_len: int, mode: str) -> float:
    """Forward FLOPs per token that ``parallel.recompute`` runs again in backward."""
    p = cfg.parallel
    if p.recompute == "none":
        return 0.0
    chosen = set(recomputed_layers(cfg.model.n_layers + cfg.model.mtp_layers, p.recompute_every))
    blocks = [flops for *_, flops in _blocks(cfg, seq_len, mode)] + [f for *_, f in _mtp_blocks(cfg, seq_len, mode)]
    total = 0.0
    for i, flops in enumerate(blocks):  # the decoder layers, then the multi-token-prediction depths' blocks
        if i in chosen:
            total += sum(v for k, v in flops.items() if p.recompute == "full" or k in SELECTIVE_RECOMPUTES)
    return total


def summary_lines(cfg) -> list[str]:
    """The start-up report: parameter classes and FLOPs per token by component."""
    p, f = param_counts(cfg), flop_counts(cfg)
    lines = [f"parameters: {p.total:,} total, {p.active:,} active per token; non-embedding (Kaplan's N) "
             f"{p.non_embedding:,}, active {p.non_embedding_active:,}; "
             + ", ".join(f"{k} x{v['layers']}: {v['total']:,} ({v['active']:,} active)" for k, v in p.by_kind.items()),
             f"training FLOPs per token: {f.per_token / 1e6:,.3f} M (forward {f.forward_per_token / 1e6:,.3f} M, "
             f"seq_len {f.seq_len}): "
             + ", ".join(f"{k} {v / f.per_token:.1%}" for k, v in f.by_component.items() if v)]
    if f.recompute_per_token:
        lines.append(f"recomputation (parallel.recompute={cfg.parallel.recompute}) adds {f.recompute_per_token / 1e6:,.3f} M "
                     f"FLOPs per token ({f.recompute_per_token / f.per_token:.1%}), not counted in mfu")
    return lines


# ----------------------------------------------------------------------------------------- peak TFLOP/s
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    # (regex on torch.cuda.get_device_name(), dense peak TFLOP/s per precision), first match wins.
    # From the vendors' data sheets, without structured sparsity.
    (r"H100.*PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL|H200.*NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (r"H100|H200|GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    (r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"V100.*PCIe", {"bf16": 112.0, "tf32": 14.0, "fp32": 14.0}),  # no bf16: fp16 tensor cores
    (r"V100", {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7}),
    (r"MI300X", {"bf16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a device by its name for 'bf16' (also fp16), 'tf32' or 'fp32'; None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[precision]
    return None


def device_peak_tflops(cfg, ds_config: dict, device) -> float | None:
    """Peak TFLOP/s for this run's MFU: train.peak_tflops if set, else the table for a CUDA device at the
    run's precision (bf16/fp16 from the DeepSpeed JSON, else tf32 when torch allows it, else fp32); None on
    CPU or for an unknown device (no mfu is logged then)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    half = any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
    precision = "bf16" if half else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    return peak_tflops(torch.cuda.get_device_name(device), precision)
