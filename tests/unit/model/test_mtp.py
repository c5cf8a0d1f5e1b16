"""Multi-token prediction (model.mtp_layers): each depth's loss by hand, the main head untouched, counted by
flops (parameters against the built model, FLOPs against FlopCounterMode)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sparselm.config import load_config
from sparselm.model import build_model
from sparselm.planning import flops

BASE = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=2", "--model.vocab_size=64",
        "--model.max_seq_len=16", "--data.seq_len=16", "--model.mtp_layers=2", "--model.mtp_loss_weight=0.25"]
MLA_MOE = ["--model.pattern=[dense,moe]", "--moe.num_experts=4", "--moe.expert_hidden=16", "--moe.expert_impl=padded",
           "--model.attention=mla", "--model.kv_lora_rank=8", "--model.qk_nope_head_dim=8",
           "--model.qk_rope_head_dim=4", "--model.v_head_dim=8"]


def batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_each_depth_predicts_one_token_further_with_the_shared_embedding_and_head():
    cfg = load_config("tiny_dense", BASE)
    model = build_model(cfg)
    ids, labels = batch(cfg)
    out = model(ids, labels)
    h, _ = model.hidden(ids)
    expected, t = [], ids.shape[1]
    for k, layer in enumerate(model.mtp, start=1):  # by hand: depth k at i reads token i + k, predicts i + k + 1
        ahead = torch.cat([ids[:, k:], ids.new_zeros(2, k)], dim=1)
        x = layer.eh_proj(torch.cat([layer.enorm(model.embed(ahead)), layer.hnorm(h)], dim=-1))
        h, _ = layer.block(x)
        logits = model.head.proj(layer.norm(h))[:, :t - k]
        expected.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, k:].reshape(-1)))
    metrics = model.metrics()
    for k, loss in enumerate(expected, start=1):
        assert metrics[f"mtp{k}_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert out.mtp_loss.item() == pytest.approx(0.25 * (expected[0] + expected[1]).item() / 2, rel=1e-6)
    assert out.loss.item() == pytest.approx((out.lm_loss + out.aux_loss + out.mtp_loss).item(), rel=1e-6)
    out.loss.backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_generation_and_evaluation_use_the_main_head_only():
    """The same weights with and without MTP depths: identical logits and main-token loss."""
    cfg, plain = load_config("tiny_dense", BASE), load_config("tiny_dense", BASE + ["--model.mtp_layers=0"])
    with_mtp, without = build_model(cfg), build_model(plain)
    assert load_config("tiny_dense").model.mtp_layers == 0  # off by default
    ids, labels = batch(cfg)
    assert torch.equal(with_mtp(ids), without(ids))
    assert with_mtp(ids, labels).lm_loss == without(ids, labels).loss
    assert without(ids, labels).mtp_loss is None


def test_mtp_is_counted_by_params_and_flops():
    cfg = load_config("tiny_dense", BASE + MLA_MOE)
    counts = flops.param_counts(cfg)
    model = build_model(cfg, device="meta")
    assert counts.total == model.num_params() and counts.active == model.num_params(active=True)
    assert counts.by_kind["mtp"]["layers"] == 2
    real = build_model(cfg)
    ids, labels = batch(cfg)
    rows = []
    for layer in real.mtp:  # the padded expert path computes experts x largest group rows
        layer.block.ffn.experts.register_forward_hook(lambda m, i, o: rows.append(i[1].numel() * int(i[1].max())))
    for block in real.layers:
        if block.kind == "moe":
            block.ffn.experts.register_forward_hook(lambda m, i, o: rows.append(i[1].numel() * int(i[1].max())))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        real(ids, labels).loss.backward()
    f = flops.flop_counts(cfg, attention="executed_dense")
    tokens = ids.numel()
    per_row = 3 * 2 * 3 * cfg.model.d_model * cfg.moe.expert_hidden
    expected = tokens * f.per_token + (sum(rows) - 3 * cfg.moe.top_k * tokens) * per_row
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
