"""Expert parallelism in real gloo processes (one spawn of 4 ranks runs every case; the tests read its report).

- a MoE layer sharded over EP=2 and EP=4 gives, on every rank, the outputs, aux losses and gradients of the
  unsharded layer (expert gradients after DeepSpeed's expert-data-parallel reduction);
- bias balancing counts the load of all ranks and keeps the bias identical everywhere;
- two optimizer steps of a small MoE model through sparselm's DeepSpeed engine (ZeRO 0, 1 and 2, DP=4 x EP=2,
  gradient clipping active) give the global grad norm and the parameters of one process on the whole batch,
  and the expert shards gather back to the one-process tensors (what checkpoints store);
- with tensor parallelism (TP=2, alone and with EP=2), routed rows split over the TP ranks
  (``deduplicate_over_tp``) and experts sharded by hidden width (``apply_expert_tensor_parallel``) give every
  rank the outputs and its piece of every gradient of the unsplit layer;
- our layer equals ``deepspeed.moe.layer.MoE`` on identical weights for top-1 and top-2.  Settings that make
  them the same function: DeepSpeed ``drop_tokens=False`` (ours dropless), ``use_rts=False``,
  ``noisy_gate_policy=None``, ``top2_2nd_expert_sampling=False``, a SwiGLU expert module; ours softmax
  scores with ``renormalize`` off for top-1 (Switch: gate = probability) and on for top-2 (GShard).  The
  balance losses agree for top-1; for top-2 DeepSpeed counts first choices only, ours counts all k.
"""
import pytest
import torch

from support.equivalence import adamw_reference_steps
from support.distributed import run_distributed

WORLD = 4


def _fresh_layer(seed=0, **kw):
    from sparselm.model.moe import MoELayer

    torch.manual_seed(seed)
    layer = MoELayer(16, 8, kw.pop("k", 2), 8, **kw)
    for m in layer.modules():
        if m is not layer and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return layer


def _layer_equivalence(rank):
    import torch.distributed as dist
    from torch import nn

    from sparselm.parallel.expert import apply_expert_parallel, expert_groups

    torch.manual_seed(1)
    inputs = [torch.randn(3, 10, 16) for _ in range(WORLD)]
    errors = {}
    for case, kw in {"dropless": {}, "dropping+shared": dict(drop_tokens=True, capacity_factor=0.7, num_shared_experts=1),
                     "top1-sigmoid": dict(k=1, score_func="sigmoid"),
                     # GLM-4-MoE / DeepSeek-V3 group-limited routing, routed scaling; Qwen2-MoE's shared-expert gate
                     "grouped+gated": dict(score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                           num_shared_experts=1, shared_expert_gate=True)}.items():
        ref = _fresh_layer(**kw)
        outs = [ref(x) for x in inputs]  # each rank's micro-batch routed on its own, as under EP
        (sum((y * y).sum() + a for y, a in outs)).backward()
        for ep in (2, 4):
            layer = _fresh_layer(**kw)
            apply_expert_parallel(nn.Sequential(layer), ep)
            y, aux = layer(inputs[rank])
            ((y * y).sum() + aux).backward()
            errs = [(y - outs[rank][0]).abs().max().item(), (aux - outs[rank][1]).abs().item()]
            for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
                grad = p.grad.clone()
                if getattr(p, "allreduce", True):  # replicated: its data-parallel sum is the whole-batch gradient
                    dist.all_reduce(grad)
                    errs.append((grad - p_ref.grad).abs().max().item())
                else:  # expert shard: sum over the replicas of these experts (expert-data-parallel group)
                    dist.all_reduce(grad, group=expert_groups(ep)[1])
                    first, count = layer.experts.first_expert, layer.experts.num_local_experts
                    assert count == 8 // ep
                    errs.append((grad - p_ref.grad[first:first + count]).abs().max().item())
            errors[f"{case} ep={ep}"] = max(errs)
    return errors


def _bias_balancing(rank):
    from torch import nn

    from sparselm.parallel.expert import apply_expert_parallel

    torch.manual_seed(2)
    inputs = [torch.randn(2, 16, 16) + 0.5 for _ in range(WORLD)]
    ref = _fresh_layer(k=1, bias_balancing=True, bias_update_rate=0.1)
    for x in inputs:
        ref(x)
    ref.after_optimizer_step()  # one process saw every rank's tokens
    layer = _fresh_layer(k=1, bias_balancing=True, bias_update_rate=0.1)
    apply_expert_parallel(nn.Sequential(layer), 2)
    layer(inputs[rank])
    layer.after_optimizer_step()
    return {"bias": layer.router.expert_bias.tolist(), "ref": ref.router.expert_bias.tolist()}


def _engine_steps(rank, stage):
    from sparselm.config import load_config
    from sparselm.training.engine import build_engine
    from sparselm.model import build_model
    from sparselm.training.optim import set_lr
    from sparselm.parallel.expert import apply_expert_parallel

    cfg = load_config("tiny_dense", ["--model.pattern=moe,dense", "--model.n_layers=2", "--model.d_model=32",
                                     "--model.n_heads=2", "--model.vocab_size=64", "--model.max_seq_len=16",
                                     "--data.seq_len=16", "--moe.num_experts=4", "--moe.top_k=2",
                                     "--parallel.ep=2", f"--parallel.zero_stage={stage}", "--optim.grad_clip=0.05",
                                     f"--train.global_batch_size={2 * WORLD}", "--optim.warmup_steps=0"])
    g = torch.Generator().manual_seed(3)
    batches = [[torch.randint(0, 64, (2, 17), generator=g) for _ in range(WORLD)] for _ in range(2)]
    lr = cfg.optim.lr

    ref = build_model(cfg)
    ref_norms = adamw_reference_steps(ref, cfg, [[(b[:, :-1], b[:, 1:]) for b in step] for step in batches])

    model = build_model(cfg)
    apply_expert_parallel(model, cfg.parallel.ep)
    engine, _ = build_engine(model, cfg, dp_size=WORLD)
    set_lr(engine.optimizer, lr)
    norms = []
    for step in batches:
        b = step[rank]
        out = engine(b[:, :-1], b[:, 1:])
        engine.backward(out.loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    err = 0.0
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name]
        if not getattr(p, "allreduce", True):
            experts = model.get_submodule(name.rsplit(".", 1)[0])
            expected = expected[experts.first_expert:experts.first_expert + experts.num_local_experts]
        err = max(err, (p.detach() - expected.detach()).abs().max().item())
    from sparselm.parallel.canonical import gather_full
    from sparselm.parallel.pieces import placements
    from sparselm.parallel.expert import expert_groups

    full = gather_full({n: p.detach() for n, p in model.named_parameters()},
                       {n: placements(p) for n, p in model.named_parameters()}, {"ep": expert_groups(2)[0]})
    canon_err = max((full[n] - ref_params[n].detach()).abs().max().item() for n in ref_params) if rank == 0 else 0.0
    moved = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(ref.parameters(), build_model(cfg).parameters()))
    return {"norms": norms, "ref_norms": ref_norms, "param_err": err, "canonical_err": canon_err, "moved": moved,
            "has_moe_layers": engine.has_moe_layers}


def _deepspeed_reference(rank):
    from deepspeed.moe.layer import MoE

    from sparselm.model.feedforward import SwiGLU
    from sparselm.parallel.topology import ensure_deepspeed_comm

    ensure_deepspeed_comm()
    result = {}
    for k in (1, 2):
        # DeepSpeed takes the balance statistics over the micro-batch: compare with our micro_batch scope
        ours = _fresh_layer(seed=4, k=k, renormalize=k == 2, aux_loss_coef=1.0, z_loss_coef=0.0, init_std=0.3, out_std=0.3,
                            balance_scope="micro_batch")
        hidden = ours.experts.hidden
        ds = MoE(16, SwiGLU(16, hidden), num_experts=8, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                 noisy_gate_policy=None, min_capacity=0, top2_2nd_expert_sampling=False)
        ds.set_deepspeed_parallelism()
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
            for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                expert.gate_proj.weight.copy_(ours.experts.gate_up_proj[e, :hidden])
                expert.up_proj.weight.copy_(ours.experts.gate_up_proj[e, hidden:])
                expert.down_proj.weight.copy_(ours.experts.down_proj[e])
        x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(5))
        y_ours, aux_ours = ours(x)
        y_ds, aux_ds, _ = ds(x)
        g = torch.randn_like(y_ours)
        gw_ours = torch.autograd.grad(y_ours, ours.router.weight, g)[0]
        gw_ds = torch.autograd.grad(y_ds, ds.deepspeed_moe.gate.wg.weight, g)[0]
        result[k] = {"y": (y_ours - y_ds).abs().max().item(), "aux": (aux_ours - aux_ds).abs().item(),
                     "router_grad": (gw_ours - gw_ds).abs().max().item(), "scale": y_ds.abs().max().item()}
    return result


def _tp_experts(rank, mode):
    """Ranks (0, 1) and (2, 3) are tensor-parallel pairs seeing the same tokens; (0, 2) and (1, 3) the
    expert-parallel groups, as the Topology places them for tp=2 x dp=2.  ``mode``: 'rows' (routed rows split
    over TP, experts whole) or 'weights' (expert tensor parallelism: each TP rank holds half of every
    expert's hidden width)."""
    import torch.distributed as dist
    from torch import nn

    from sparselm.parallel.comm import GroupReducer
    from sparselm.parallel.expert import apply_expert_parallel, apply_expert_tensor_parallel, deduplicate_over_tp
    from sparselm.parallel.pieces import piece, placements

    tp_group = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    ep_group = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    # the reducer sums elements, not raw memory, when the ranks hold a tensor in different layouts
    x = torch.arange(6.0).view(2, 3)
    summed = GroupReducer(tp_group)(x.t().contiguous().t() if rank % 2 else x)
    errors = {"layouts": (summed - 2 * x).abs().max().item()}
    torch.manual_seed(2)
    inputs = [torch.randn(3, 10, 16) for _ in range(2)]
    for ep in (1, 2):
        groups = {"tp": tp_group, "ep": ep_group if ep > 1 else None}
        for case, kw in {"dropless": {}, "dropping+shared": dict(drop_tokens=True, capacity_factor=0.7,
                                                                 num_shared_experts=1)}.items():
            ref = _fresh_layer(**kw)
            outs = [ref(x) for x in inputs]
            (sum((y * y).sum() + a for y, a in outs)).backward()
            layer = _fresh_layer(**kw)
            if ep > 1:
                apply_expert_parallel(nn.Sequential(layer), ep, ep_group=ep_group)
            if mode == "rows":
                deduplicate_over_tp(nn.Sequential(layer), tp_group)
            else:
                apply_expert_tensor_parallel(nn.Sequential(layer), tp_group)
                assert layer.experts.gate_up_proj.shape[1] == 8 and layer.experts.down_proj.shape[2] == 4  # halves
            mine = inputs[rank // 2]
            y, aux = layer(mine)
            ((y * y).sum() + aux).backward()
            errs = [(y - ref(mine)[0]).abs().max().item()]
            own = _fresh_layer(**kw)  # gradients of this rank's tokens alone, for the replicated parameters
            y_own, aux_own = own(mine)
            ((y_own * y_own).sum() + aux_own).backward()
            for (name, p), p_ref, p_own in zip(layer.named_parameters(), ref.parameters(), own.parameters()):
                if name.startswith("experts"):  # this rank's piece; with ep > 1 it gets the tokens of both EP ranks
                    expected = piece((p_ref if ep > 1 else p_own).grad, placements(p), groups)
                    errs.append((p.grad - expected).abs().max().item())
                else:
                    errs.append((p.grad - p_own.grad).abs().max().item())
            errors[f"{case} ep={ep}"] = max(errs)
    return errors


def _all_cases(rank, world_size):
    return {"layer": _layer_equivalence(rank), "tp_dedup": _tp_experts(rank, "rows"), "tp_experts": _tp_experts(rank, "weights"), "bias": _bias_balancing(rank),
            "engine0": _engine_steps(rank, 0), "engine1": _engine_steps(rank, 1), "engine2": _engine_steps(rank, 2),
            "deepspeed": _deepspeed_reference(rank)}


@pytest.fixture(scope="module")
def report():
    return run_distributed(_all_cases, WORLD)


def test_expert_parallel_layer_matches_one_process(report):
    for rank, r in enumerate(report):
        assert set(r["layer"]) == {f"{c} ep={ep}" for c in ("dropless", "dropping+shared", "top1-sigmoid", "grouped+gated") for ep in (2, 4)}
        for case, err in r["layer"].items():
            assert err < 1e-5, (rank, case, err)


@pytest.mark.parametrize("mode", ["tp_dedup", "tp_experts"])
def test_experts_under_tensor_parallelism_match_one_process(report, mode):
    """Routed rows split over the TP ranks (moe_tp_mode=rows) and experts sharded by hidden width (weights):
    outputs and every gradient piece equal the unsharded layer, with TP=2 alone and TP=2 x EP=2."""
    for rank, r in enumerate(report):
        assert set(r[mode]) == {"layouts"} | {f"{c} ep={ep}" for c in ("dropless", "dropping+shared") for ep in (1, 2)}
        for case, err in r[mode].items():
            assert err < 1e-5, (rank, case, err)


def test_bias_update_counts_every_rank_and_stays_identical(report):
    ref = report[0]["bias"]["ref"]
    assert any(ref)
    for r in report:
        assert r["bias"]["bias"] == ref


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_engine_steps_match_one_process(report, stage):
    for r in report:
        e = r[f"engine{stage}"]
        assert e["has_moe_layers"]
        assert e["ref_norms"][0] > 0.05  # clipping was active, so a wrong norm would change the update
        assert e["norms"] == pytest.approx(e["ref_norms"], rel=1e-4)
        assert e["moved"] > 1e-3 and e["param_err"] < 1e-5
        assert e["canonical_err"] < 1e-5  # expert shards gather back to the one-process tensors (checkpoints)


@pytest.mark.parametrize("k", [1, 2])
def test_same_function_as_deepspeed_moe(report, k):
    d = report[0]["deepspeed"][k]
    assert d["scale"] > 0.1
    assert d["y"] < 1e-5 * d["scale"]
    assert d["router_grad"] < 1e-5
    if k == 1:
        assert d["aux"] < 1e-6
