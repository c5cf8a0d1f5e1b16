"""sparselm.planning.flops: parameter counts against the built model, FLOPs against torch's FlopCounterMode."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sparselm.planning import flops
from sparselm.config import load_config
from sparselm.data.vocab import derive_vocab_size
from sparselm.model import build_model
from sparselm.model.moe.config import resolved_expert_hidden
from sparselm.model.moe.experts import GroupedExperts
from sparselm.model.transformer import SparseLM
from sparselm.parallel.recompute import apply_recompute

PRESETS = ["tiny_dense", "tiny_moe", "tiny_pkm", "tiny_allattn", "tiny_mixed"]
# Variants that reach the other branches: shared/gated/narrow PKM tables beside an FFN, tied embeddings,
# BigBird with memory; noisy gating, grouped-query heads, no shared expert, all-attention beside MoE.
VARIANTS = {
    "pkm_shared_gated": ("tiny_pkm", ["--model.pattern=pkm,dense,pkm,pkm_ffn", "--pkm.share_values=0,2,3",
                                      "--pkm.gated=true", "--pkm.v_dim=64", "--attention.pattern=bigbird",
                                      "--attention.block=32", "--model.tie_embeddings=true", "--pkm.n_keys=1024",
                                      "--pkm.knn=16"]),
    "moe_noisy_gqa_allattn": ("tiny_moe", ["--moe.noisy_gating=true", "--moe.num_shared_experts=0",
                                           "--model.n_kv_heads=2", "--model.pattern=moe,allattn",
                                           "--attention.persistent_slots=24"]),
    # gpt-oss's pieces: sinks on causal SDPA and beside memory, q/k/v/o biases, router and expert biases
    "moe_gpt_oss_sinks": ("tiny_moe", ["--model.attention_sinks=true", "--model.o_bias=true", "--model.qkv_bias=true",
                                       "--moe.router_bias=true", "--moe.expert_biases=true", "--moe.swiglu_limit=7",
                                       "--model.n_kv_heads=2", "--model.pattern=moe,allattn",
                                       "--attention.persistent_slots=24"]),
    # multi-head latent attention: query latent, interleaved rope, yarn's softmax-scale fold, DeepSeek's projection
    # biases, MoE beside it;
    # and one query projection, no unrotated channels, a sliding layer
    "mla_q_lora_moe": ("tiny_moe", ["--model.attention=mla", "--model.q_lora_rank=24", "--model.kv_lora_rank=16",
                                    "--model.qk_nope_head_dim=16", "--model.qk_rope_head_dim=8",
                                    "--model.v_head_dim=24", "--model.rope_interleave=true",
                                    "--model.rope.scaling=yarn", "--model.rope.factor=4",
                                    "--model.rope.original_max_seq_len=32", "--model.rope.mscale_all_dim=1.0",
                                    "--model.qkv_bias=true", "--model.o_bias=true"]),
    "mla_no_q_lora_sliding": ("tiny_dense", ["--model.attention=mla", "--model.kv_lora_rank=32",
                                             "--model.qk_nope_head_dim=0", "--model.qk_rope_head_dim=16",
                                             "--model.v_head_dim=16", "--model.attention_layers=full,sliding",
                                             "--model.sliding_window=8"]),
    # and under a sparse pattern (BigBird's blocks choose the keys of the latent scores)
    "mla_bigbird": ("tiny_deepseek", ["--attention.pattern=bigbird", "--attention.block=16",
                                      "--attention.backend=reference", "--model.mtp_layers=0"]),
}
CASES = [(name, []) for name in PRESETS] + list(VARIANTS.values())
IDS = PRESETS + list(VARIANTS)


def resolved(name: str, overrides: list[str] | None = None):
    cfg = load_config(name, overrides or [])
    derive_vocab_size(cfg)
    return cfg


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_param_counts_match_the_built_model(name, overrides):
    cfg = resolved(name, overrides)
    counts = flops.param_counts(cfg)
    model = build_model(cfg, device="meta")
    assert counts.total == model.num_params()
    assert counts.active == model.num_params(active=True)
    vocab = model.embed.weight.numel() + (0 if cfg.model.tie_embeddings else model.head.proj.weight.numel())
    assert counts.non_embedding == counts.total - vocab
    assert counts.non_embedding_active == counts.active - vocab
    by_kind: dict[str, list[int]] = {}
    seen: set[int] = set()  # a shared PKM table belongs to its first (owning) layer
    for block in model.layers:  # per block kind, with the block's own active-parameter hooks
        entry = by_kind.setdefault(block.kind, [0, 0, 0])
        entry[0] += 1
        entry[1] += sum(p.numel() for p in block.parameters() if id(p) not in seen)
        seen.update(id(p) for p in block.parameters())
        entry[2] += SparseLM.num_params(block, active=True)
    assert {k: [v["layers"], v["total"], v["active"]] for k, v in counts.by_kind.items()} == by_kind


def test_tiny_dense_hand_count():
    cfg = resolved("tiny_dense")
    m = cfg.model
    d, h, v, layers = m.d_model, m.ffn_hidden, m.vocab_size, m.n_layers
    per_layer = 4 * d * d + 3 * d * h + 2 * d  # q, k, v, o; gate, up, down; two norms
    assert flops.param_counts(cfg).total == 2 * v * d + d + layers * per_layer
    assert flops.param_counts(cfg).non_embedding == d + layers * per_layer
    # Kaplan: C_forward = 2N + 2 n_layer n_ctx d_attn; ours counts the causal mean (T + 1) / 2 keys, 3x for training
    f = flops.flop_counts(cfg)
    t = cfg.data.seq_len
    assert f.per_token == 3 * (2 * (layers * (4 * d * d + 3 * d * h) + v * d) + 4 * layers * d * (t + 1) / 2)


def measured_flops(cfg, batch: int = 2) -> tuple[int, int]:
    """FlopCounterMode's forward+backward count of one batch, and the padded expert rows it computed."""
    torch.manual_seed(0)
    model = apply_recompute(build_model(cfg), cfg)  # (parallel.recompute none: the model as built)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    padded_rows = []
    for module in model.modules():
        if isinstance(module, GroupedExperts):  # the padded path computes experts x largest group rows
            module.register_forward_hook(lambda mod, inp, out: padded_rows.append(inp[1].numel() * int(inp[1].max())))
    # The math SDPA backend is made of bmm's FlopCounterMode sees; torch 2.13 has no FLOP formula for the CPU
    # flash kernel that causal SDPA takes otherwise (it would count nothing for attention).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, ids).loss.backward()
    return counter.get_total_flops(), sum(padded_rows)


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_flops_match_flop_counter(name, overrides):
    """Analytic training FLOPs against FlopCounterMode on each tiny preset.  Accounted for: attention as the
    dense masked SDPA executes it (FlopCounterMode cannot see a pattern), MoE under expert_impl=padded
    at the padded row count (it does not count torch._grouped_mm), and the PKM top-k and value read
    (topk, embedding_bag and sampled_addmm are not matmuls it counts: it sees none of the read's three passes
    in fp32 on CPU, where the backward groups the reads by row, sparselm/model/pkm/read.py).  The issue asks
    for 5%; the counts agree exactly."""
    cfg = resolved(name, ["--moe.expert_impl=padded", *overrides])
    measured, padded_rows = measured_flops(cfg)
    tokens = 2 * cfg.data.seq_len
    f = flops.flop_counts(cfg, attention="executed_dense")
    expected = tokens * (f.per_token - f.by_component.get("pkm_topk", 0) - f.by_component.get("pkm_values", 0))
    moe_layers = cfg.model.layer_kinds().count("moe")
    if moe_layers:
        per_row = 3 * 2 * 3 * cfg.model.d_model * resolved_expert_hidden(cfg)  # training FLOPs of one expert row
        expected += (padded_rows - moe_layers * cfg.moe.top_k * tokens) * per_row
    assert abs(measured / expected - 1) < 0.05
    assert measured == pytest.approx(expected, rel=1e-9)
    # model FLOPs count only the keys the pattern shows: never more than the executed dense attention
    model_flops = flops.flop_counts(cfg)
    assert model_flops.by_component["attention_core"] <= f.by_component["attention_core"]
    assert model_flops.per_token - model_flops.by_component["attention_core"] == pytest.approx(
        f.per_token - f.by_component["attention_core"])


@pytest.mark.parametrize("every", [1, 2])
def test_selective_recomputation_flops_match_flop_counter(every):
    """recompute_per_token under parallel.recompute=selective is what FlopCounterMode counts more than without
    recomputation: the recomputed blocks' attention core (the weight matmuls are kept), the multi-token-prediction
    depths' blocks included (numbered after the 4 decoder layers: every=2 picks layers 1, 3 and the second
    depth).  (Under full, torch's checkpoint stops recomputing after the last tensor backward needs, so it
    skips each block's last matmul, which the count includes.)"""
    overrides = [*VARIANTS["mla_no_q_lora_sliding"][1], "--model.mtp_layers=2"]
    plain, _ = measured_flops(resolved("tiny_dense", overrides))
    cfg = resolved("tiny_dense", [*overrides, "--parallel.recompute=selective", f"--parallel.recompute_every={every}"])
    measured, _ = measured_flops(cfg)
    f = flops.flop_counts(cfg, attention="executed_dense")
    assert f.recompute_per_token > 0
    assert measured - plain == pytest.approx(2 * cfg.data.seq_len * f.recompute_per_token, rel=1e-9)


@pytest.mark.parametrize("pattern,extra,visible", [
    ("causal", [], lambda t: sum(q + 1 for q in range(t)) / t),
    ("sliding_window", ["--attention.window=16"], lambda t: sum(min(q + 1, 16) for q in range(t)) / t),
    ("block_local", ["--attention.block=32"], lambda t: sum(q % 32 + 1 for q in range(t)) / t),
    ("strided", ["--attention.stride=16"],
     lambda t: sum(sum(1 for k in range(q + 1) if q - k < 16 or (q - k) % 16 == 0) for q in range(t)) / t),
])
def test_mean_visible_keys_by_hand(pattern, extra, visible):
    cfg = resolved("tiny_dense", [f"--attention.pattern={pattern}", *extra])
    t = cfg.data.seq_len
    assert flops.mean_visible_keys(cfg) == pytest.approx(visible(t))
    f = flops.flop_counts(cfg)
    assert f.by_component["attention_core"] == pytest.approx(3 * 4 * cfg.model.d_model * visible(t) * cfg.model.n_layers)


def test_moe_and_pkm_count_active_work_only():
    dense, moe = resolved("tiny_dense"), resolved("tiny_moe")
    fm = flops.flop_counts(moe).by_component
    e = moe.moe
    hidden = resolved_expert_hidden(moe)
    d, layers = moe.model.d_model, moe.model.n_layers
    assert fm["moe_experts"] == 3 * 2 * e.top_k * 3 * d * hidden * layers  # top_k of num_experts experts
    assert fm["moe_router"] == 3 * 2 * e.num_experts * d * layers
    more = resolved("tiny_moe", ["--moe.num_experts=32"])  # 4x the experts: same expert FLOPs per token
    assert flops.flop_counts(more).by_component["moe_experts"] == fm["moe_experts"]
    assert flops.param_counts(more).total > flops.param_counts(moe).total
    pkm = resolved("tiny_pkm")
    big = resolved("tiny_pkm", ["--pkm.n_keys=65536"])  # 4x the slots: value read unchanged, sub-keys 2x
    fp, fb = flops.flop_counts(pkm).by_component, flops.flop_counts(big).by_component
    assert fb["pkm_values"] == fp["pkm_values"] == 3 * 2 * pkm.pkm.heads * pkm.pkm.knn * d
    assert fb["pkm_subkeys"] == 2 * fp["pkm_subkeys"]
    assert flops.param_counts(dense).total < flops.param_counts(pkm).total


def test_peak_table_and_mfu_device():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert flops.peak_tflops("NVIDIA A10", "bf16") == 125.0  # not taken for an A100
    assert flops.peak_tflops("Some Future Accelerator", "bf16") is None
    cfg = resolved("tiny_dense", ["--train.peak_tflops=100"])
    assert flops.device_peak_tflops(cfg, {}, torch.device("cpu")) is None  # no mfu on CPU
    assert flops.device_peak_tflops(cfg, {}, torch.device("cuda", 0)) == 100.0


def test_block_kind_registered_elsewhere():
    from sparselm.model.cost import SwiGLUCost
    from sparselm.model.feedforward import SwiGLU
    from sparselm.model.registry import BLOCKS, default_attention, register_block

    @register_block("wide_test", cost=SwiGLUCost(hidden=lambda cfg: 2 * cfg.model.ffn_hidden))
    def wide(cfg, layer_idx):
        return default_attention(cfg, layer_idx), SwiGLU(cfg.model.d_model, 2 * cfg.model.ffn_hidden)

    try:
        cfg = resolved("tiny_dense", ["--model.pattern=dense,wide_test"])
        counts, model = flops.param_counts(cfg), build_model(cfg, device="meta")
        assert counts.total == model.num_params() and counts.active == model.num_params(active=True)
        f = flops.flop_counts(cfg)
        dense = flops.flop_counts(resolved("tiny_dense"))
        per_layer_extra = 3 * 2 * 3 * cfg.model.d_model * cfg.model.ffn_hidden  # the doubled hidden width
        assert f.by_kind["wide_test"] - f.by_kind["dense"] == 2 * per_layer_extra  # 2 layers of each kind
        assert f.per_token > dense.per_token
    finally:
        del BLOCKS["wide_test"]


def test_a_block_kind_without_a_cost_model_is_refused_by_name():
    from sparselm.model.registry import BLOCKS, block_cost, register_block

    with pytest.raises(TypeError, match="'costless_test'"):
        register_block("costless_test")
    assert "costless_test" not in BLOCKS
    cfg = resolved("tiny_dense")
    cfg.model.pattern = ["dense", "costless_test"]
    with pytest.raises(flops.ConfigError, match="'costless_test' has no cost model"):
        flops.flop_counts(cfg)
    with pytest.raises(flops.ConfigError, match="'costless_test'"):
        block_cost("costless_test")


def test_unresolved_vocab_is_refused():
    cfg = load_config("tiny_dense")
    with pytest.raises(flops.ConfigError, match="vocab_size"):
        flops.param_counts(cfg)
    assert math.isfinite(flops.flop_counts(resolved("tiny_dense")).per_token)
