"""Tensor parallelism: a TP=2 model (2 real gloo processes) computes what the one-process model computes.

Every model case runs in one spawn: full logits, loss and every gradient (gathered back to full shape)
within 1e-5 relative in fp32, then one DeepSpeed step through ``topo.mpu`` (gradient norm and updated
weights equal a plain AdamW step of the one-process model)."""
from __future__ import annotations


import pytest
import torch

from support.run import rel_error
from support.equivalence import adamw_reference_steps, parallel_vs_reference
from support.distributed import run_distributed

BASE = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4", "--model.vocab_size=64",
        "--model.d_ff=64", "--model.max_seq_len=16", "--data.seq_len=16", "--train.global_batch_size=2"]
CASES = {
    "mha": [],
    "gqa": ["--model.n_kv_heads=2", "--model.rope_interleave=true"],  # with ERNIE 4.5's interleaved rope pairs
    "tied": ["--model.tie_embeddings=true"],
    # the Hugging Face families' attention options: head width != d_model / heads, q/k/v biases, per-head q/k
    # norm (one weight used by both ranks' heads), clipping, partial yarn rotary, a sliding window in layer 1
    "hf_per_head": ["--model.head_dim=12", "--model.qkv_bias=true", "--model.qk_norm=per_head", "--model.clip_qkv=0.5",
                    "--model.rotary_fraction=0.5", "--model.rope.scaling=yarn", "--model.rope.factor=4",
                    "--model.rope.original_max_seq_len=8", "--model.sliding_window=5",
                    "--model.attention_layers=full,sliding"],
    # full-width q/k norm (channels split with the heads, mean of squares summed over ranks), llama3 rotary
    "hf_full_norm": ["--model.n_kv_heads=2", "--model.qk_norm=full", "--model.rope.scaling=llama3",
                     "--model.rope.factor=8", "--model.rope.original_max_seq_len=8"],
    # multi-head latent attention: heads split in the up-projections, latents and the shared rotary key whole
    "mla_q_lora": ["--model.attention=mla", "--model.q_lora_rank=12", "--model.kv_lora_rank=8",
                   "--model.qk_nope_head_dim=8", "--model.qk_rope_head_dim=4", "--model.v_head_dim=6",
                   "--model.rope_interleave=true", "--model.rope.scaling=yarn", "--model.rope.factor=4",
                   "--model.rope.original_max_seq_len=8", "--model.rope.mscale_all_dim=1.0",
                   "--model.sliding_window=5", "--model.attention_layers=full,sliding"],
    "mla": ["--model.attention=mla", "--model.kv_lora_rank=8", "--model.qk_nope_head_dim=4",
            "--model.qk_rope_head_dim=4", "--model.v_head_dim=8"],
}
# q/k/v biases; q/k norm weights (per layer); MLA: q (or q_b), kv_b, o instead of q, k, v, o (per layer)
EXTRA_SHARDED = {"hf_per_head": 2 * 3, "hf_full_norm": 2 * 2, "mla_q_lora": -2, "mla": -2}



def _batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = torch.randint(0, vocab, (2, 12), generator=g)
    labels[0, :3] = -100  # ignored positions must stay ignored under the vocab-parallel loss
    return ids, labels


def _compare_case(overrides: list[str]) -> dict:
    from sparselm.config import load_config
    from sparselm.parallel.pieces import is_sharded_over
    from sparselm.parallel.tensor import ColumnLinear, RowLinear

    cfg1 = load_config(None, BASE + overrides)
    cfg2 = load_config(None, BASE + overrides + ["--parallel.tp=2"])

    def check(model, topo):
        attn, ffn = model.layers[0].attn, model.layers[0].ffn
        if cfg1.model.attention == "mla":
            up = attn.q_b_proj if attn.q_lora else attn.q_proj
            assert isinstance(up, ColumnLinear) and isinstance(attn.kv_b_proj, ColumnLinear)
            assert isinstance(attn.o_proj, RowLinear) and not is_sharded_over(attn.kv_a_proj.weight, "tp")
            assert attn.kv_b_proj.weight.shape[0] == cfg1.model.n_heads // 2 * (
                cfg1.model.qk_nope_head_dim + cfg1.model.v_head_dim)
            return {"sharded_count": sum(is_sharded_over(p, "tp") for p in model.parameters())}
        # really sharded: this rank holds half of every split dimension
        assert isinstance(attn.q_proj, ColumnLinear) and isinstance(attn.o_proj, RowLinear)
        assert isinstance(ffn.up_proj, ColumnLinear) and isinstance(ffn.down_proj, RowLinear)
        assert attn.k_proj.weight.shape[0] == cfg1.model.kv_heads * cfg1.model.head_width // 2
        assert ffn.down_proj.weight.shape[1] == cfg1.model.ffn_hidden // 2
        assert model.embed.weight.shape[0] == model.head.proj.weight.shape[0] == cfg1.model.vocab_size // 2
        assert (model.head.proj.weight is model.embed.weight) == cfg1.model.tie_embeddings
        return {"sharded_count": sum(is_sharded_over(p, "tp") for p in model.parameters())}

    return parallel_vs_reference(cfg1, cfg2, *_batch(cfg1.model.vocab_size), check=check)


def _engine_step() -> dict:
    """One DeepSpeed step (ZeRO-1, the default ds_config) of the TP model with topo.mpu, against a plain
    one-process AdamW step with the same groups, clipping and learning rate."""
    from sparselm.config import load_config
    from sparselm.training.engine import build_engine
    from sparselm.model import build_model
    from sparselm.parallel import parallelize
    from sparselm.parallel.pieces import assemble, placements
    from sparselm.parallel.topology import Topology

    over = BASE + ["--optim.grad_clip=0.05", "--optim.weight_decay=0.1"]
    cfg1, cfg2 = load_config(None, over), load_config(None, over + ["--parallel.tp=2"])
    ids, labels = _batch(cfg1.model.vocab_size)
    o = cfg1.optim

    ref = build_model(cfg1)
    [ref_norm] = adamw_reference_steps(ref, cfg1, [[(ids, labels)]])

    topo = Topology(cfg2)
    model = parallelize(build_model(cfg2), cfg2, topo)
    engine, _ = build_engine(model, cfg2, topo.dp_size, mpu=topo.mpu)
    engine.backward(engine(ids, labels).loss)
    engine.step()
    errors = {"grad_norm": abs(float(engine.get_global_grad_norm()) - ref_norm) / ref_norm}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        errors[f"updated:{name}"] = rel_error(assemble(p.detach(), placements(p), {"tp": topo.tp_group}), ref_params[name].detach())
    assert ref_norm > o.grad_clip  # the clipping path is exercised
    return errors


def _all_cases(rank, world):
    torch.manual_seed(0)
    results = {case: _compare_case(over) for case, over in CASES.items()}
    results["engine"] = _engine_step()
    results["collectives"] = _collectives(rank, world)
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_all_cases, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_equals_tp1(tp2_results, case):
    for rank, results in enumerate(tp2_results):
        errors = dict(results[case])
        # embeddings, q/k/v/o, gate/up/down of 2 layers, head: all sharded (the tied head shares one)
        assert errors.pop("sharded_count") == 1 + 2 * 7 + (0 if case == "tied" else 1) + EXTRA_SHARDED.get(case, 0)
        bad = {k: v for k, v in errors.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}, {case}: relative errors above 1e-5: {bad}"


def test_tp2_deepspeed_step_with_mpu_equals_one_process(tp2_results):
    for rank, results in enumerate(tp2_results):
        bad = {k: v for k, v in results["engine"].items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: relative errors above 1e-5: {bad}"


def _collectives(rank, world):
    import torch.distributed as dist

    from sparselm.parallel.comm import gather_along_dim, split_along_dim

    group = dist.new_group(list(range(world)))
    x = (torch.arange(6.0).view(2, 3) + 10 * rank).requires_grad_()
    y = gather_along_dim(x, -1, group)
    assert y.shape == (2, 3 * world)
    torch.testing.assert_close(y, torch.cat([torch.arange(6.0).view(2, 3) + 10 * r for r in range(world)], dim=1))
    (y * torch.arange(float(y.numel())).view_as(y)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(float(y.numel())).view_as(y).chunk(world, 1)[rank])

    full = torch.arange(8.0).view(4, 2).requires_grad_()
    part = split_along_dim(full, 0, group)
    torch.testing.assert_close(part, torch.arange(8.0).view(4, 2).chunk(world, 0)[rank])
    part.sum().backward()  # the gradient of every rank's chunk comes back whole
    torch.testing.assert_close(full.grad, torch.ones(4, 2))
    return True


def test_gather_and_split_autograd(tp2_results):
    assert [r["collectives"] for r in tp2_results] == [True, True]


def test_rule_dispatch_uses_most_specific_class():
    from sparselm.config import load_config
    from sparselm.model.attention import Attention
    from sparselm.parallel import tensor

    class Special(Attention):
        pass

    class MoreSpecial(Special):
        pass

    mcfg = load_config(None, BASE).model
    assert tensor.rule_for(Attention(mcfg)) is tensor.tp_attention
    assert tensor.rule_for(Special(mcfg)) is tensor.tp_attention

    def special_rule(module, topo):
        return module

    tensor.register_tp_rule(Special)(special_rule)
    try:
        assert tensor.rule_for(MoreSpecial(mcfg)) is special_rule
        assert tensor.rule_for(Attention(mcfg)) is tensor.tp_attention
        assert tensor.rule_for(torch.nn.ReLU()) is None
    finally:
        del tensor._RULES[Special]
