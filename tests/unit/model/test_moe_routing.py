"""Routing math of the MoE layer on hand-made cases: selection, renormalisation, capacity drops in
probability order, losses, noisy gating, bias balancing, config checks."""
import math

import pytest
import torch

from sparselm.config import ConfigError, load_config
from sparselm.model.moe import MoELayer, balance_loss, expert_capacity, plan_dispatch, route, z_loss


def _layer(d=8, e=4, k=2, hidden=8, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(d, e, k, hidden, **kw)
    layer.router.reset_parameters()
    layer.experts.reset_parameters()
    return layer


def test_topk_selection_and_renormalisation():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]]))
    r = route(logits, k=2, renormalize=False)
    assert r.experts.tolist() == [[1, 2], [3, 0]]
    assert torch.allclose(r.gates, torch.tensor([[0.5, 0.3], [0.5, 0.4]]))
    r = route(logits, k=2, renormalize=True)
    assert torch.allclose(r.gates, torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.5 / 0.9, 0.4 / 0.9]]))
    assert torch.allclose(r.probs, torch.tensor([[0.5, 0.3], [0.5, 0.4]]))  # drop priority stays unnormalised
    r = route(logits.half(), k=1, renormalize=False)
    assert r.gates.dtype == torch.float32 and r.experts.tolist() == [[1], [3]]


def test_sigmoid_scores_are_independent_per_expert():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    r = route(logits, k=2, score_func="sigmoid", renormalize=False)
    assert r.experts.tolist() == [[0, 2]]
    assert torch.allclose(r.gates, torch.sigmoid(torch.tensor([[2.0, 0.5]])))
    r = route(logits, k=2, score_func="sigmoid", renormalize=True)
    assert torch.allclose(r.gates.sum(-1), torch.ones(1))


def test_bias_changes_selection_but_not_gates():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    bias = torch.tensor([-1.0, 0.0, 0.0])
    r = route(logits, k=1, renormalize=False, bias=bias)
    assert r.experts.tolist() == [[1]]
    assert torch.allclose(r.gates, torch.tensor([[0.3]]))  # the unbiased probability of the chosen expert


def test_capacity_keeps_earliest_positions_by_default():
    # Five tokens all choose expert 0 (k=1); capacity 2 keeps tokens 0 and 1 whatever their probabilities.
    experts = torch.zeros(5, 1, dtype=torch.long)
    probs = torch.tensor([[0.3], [0.8], [0.2], [0.9], [0.5]])
    plan = plan_dispatch(experts, probs, num_experts=2, capacity=2)
    assert sorted(plan.order.tolist()) == [0, 1]
    assert plan.counts.tolist() == [2, 0] and plan.routed.tolist() == [5, 0]
    # Token-major: token 0's second choice comes before token 1's first choice.
    experts = torch.tensor([[1, 0], [0, 1], [0, 1]])
    plan = plan_dispatch(experts, torch.rand(3, 2), num_experts=2, capacity=1)
    assert set(plan.order.tolist()) == {0, 1}
    # Two sequences of 3 tokens: with a capacity per sequence each keeps its first two; with one capacity
    # over both, positions come first (tokens 0 and 3 are both position 0), so no token loses its place
    # to a later position of another sequence.
    experts, probs = torch.zeros(6, 1, dtype=torch.long), torch.rand(6, 1)
    plan = plan_dispatch(experts, probs, 2, capacity=2, sequences=2, per_sequence=True)
    assert plan.order.tolist() == [0, 1, 3, 4] and plan.counts.tolist() == [4, 0]
    plan = plan_dispatch(experts, probs, 2, capacity=3, sequences=2)
    assert sorted(plan.order.tolist()) == [0, 1, 3]


def test_probability_policy_drops_lowest_probability_first():
    # Five tokens all choose expert 0 (k=1) with these probabilities; capacity 2 keeps tokens 3 and 1.
    experts = torch.zeros(5, 1, dtype=torch.long)
    probs = torch.tensor([[0.3], [0.8], [0.2], [0.9], [0.5]])
    plan = plan_dispatch(experts, probs, num_experts=2, capacity=2, policy="probability")
    assert sorted(plan.order.tolist()) == [1, 3]
    assert plan.counts.tolist() == [2, 0] and plan.routed.tolist() == [5, 0]
    # Priority is by probability across choices too: token 0's second choice (0.45) beats token 1's first (0.4).
    experts = torch.tensor([[1, 0], [0, 1], [0, 1]])
    probs = torch.tensor([[0.55, 0.45], [0.4, 0.35], [0.3, 0.2]])
    plan = plan_dispatch(experts, probs, num_experts=2, capacity=1, policy="probability")
    # assignment id = token * k + choice: expert 1 keeps (t0, 0.55) = 0, expert 0 keeps (t0, 0.45) = 1
    assert set(plan.order.tolist()) == {0, 1}
    assert expert_capacity(num_tokens=10, top_k=2, num_experts=4, capacity_factor=1.25) == math.ceil(1.25 * 10 * 2 / 4)


def test_dropped_tokens_output_zero_and_kept_tokens_unchanged():
    dropless = _layer(e=2, k=1, renormalize=False)
    dropping = _layer(e=2, k=1, renormalize=False, drop_tokens=True, capacity_factor=0.5)
    x = torch.randn(1, 12, 8)
    y_full, _ = dropless(x)
    y_drop, _ = dropping(x)
    routing = dropping.router.route(x.view(-1, 8))
    plan = plan_dispatch(routing.experts, routing.probs, 2, expert_capacity(12, 1, 2, 0.5))
    kept = torch.zeros(12, dtype=torch.bool)
    kept[plan.order] = True
    assert 0 < kept.sum() < 12
    assert torch.equal(y_drop.view(12, 8)[~kept], torch.zeros(int((~kept).sum()), 8))
    torch.testing.assert_close(y_drop.view(12, 8)[kept], y_full.view(12, 8)[kept])
    assert dropping.metrics["dropped_frac"].item() == pytest.approx(1 - kept.sum().item() / 12)
    # Within each expert the kept tokens come before every dropped one (position order: causal).
    position = torch.arange(12)
    for e in range(2):
        mine = routing.experts[:, 0] == e
        if (mine & ~kept).any():
            assert position[mine & kept].max() < position[mine & ~kept].min()


def test_balance_and_z_loss_values():
    n, e = 8, 4
    uniform = torch.full((n, e), 1 / e)
    assert balance_loss(uniform, torch.full((e,), 2)).item() == pytest.approx(1.0)
    # All assignments on expert 0 with probability 1 there: E * 1 * 1.
    skewed = torch.zeros(n, e)
    skewed[:, 0] = 1
    assert balance_loss(skewed, torch.tensor([n, 0, 0, 0])).item() == pytest.approx(e)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)


def test_aux_loss_is_weighted_sum_and_metrics_are_recorded():
    layer = _layer(aux_loss_coef=0.3, z_loss_coef=0.07)
    _, aux = layer(torch.randn(2, 5, 8))
    m = layer.metrics
    assert aux.item() == pytest.approx(0.3 * m["balance_loss"].item() + 0.07 * m["z_loss"].item(), rel=1e-6)
    assert m["expert_load"].shape == (4,) and m["expert_load"].sum().item() == pytest.approx(1.0)
    assert m["dropped_frac"].item() == 0.0
    assert all(not v.requires_grad for v in m.values())
    # The imbalance is a maximum: taken once per optimizer step over all of the step's forwards.
    x2 = torch.randn(3, 5, 8)
    layer(x2)
    loads = m["expert_load"] * 10 + layer.metrics["expert_load"] * 15
    layer.after_optimizer_step()
    assert layer.step_metrics["load_max"].item() == pytest.approx((loads.max() / loads.sum() * 4).item(), rel=1e-6)


def test_noisy_gating_is_random_in_training_only_and_learns_its_scale():
    layer = _layer(noisy_gating=True)
    x = torch.randn(4, 6, 8)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    y1, y2 = layer(x)[0], layer(x)[0]
    assert not torch.equal(y1, y2)
    y1.square().sum().backward()
    assert layer.router.noise_weight.grad is not None and layer.router.noise_weight.grad.abs().sum() > 0


def test_bias_balancing_moves_load_toward_uniform():
    layer = _layer(e=4, k=1, renormalize=False, bias_balancing=True, bias_update_rate=0.02, aux_loss_coef=0.0)
    with torch.no_grad():  # diverse per-token preferences, plus a strong pull toward expert 0
        layer.router.weight.normal_(0, 1.0)
        layer.router.weight[0, 0] += 4.0
    x = torch.randn(1, 512, 8)
    x[..., 0] = 1.0
    layer.train()
    layer(x)
    start = layer.metrics["expert_load"].max().item() * 4
    assert start > 1.8 and layer.metrics["expert_load"].argmax() == 0
    late = []
    for step in range(60):
        layer(x)
        layer.after_optimizer_step()
        if step >= 50:
            late.append(layer.step_metrics["load_max"].item())
    assert sum(late) / len(late) < 1 + 0.25 * (start - 1)  # a sign update oscillates near balance: average
    assert layer.router.expert_bias[0] < 0  # the overloaded expert is pushed down
    # The bias only selects: gates are still the unbiased probabilities.
    routing = layer.router.route(x.view(-1, 8))
    probs = torch.softmax(layer.router(x.view(-1, 8)), -1)
    assert torch.allclose(routing.gates[:, 0], probs.gather(1, routing.experts)[:, 0])
    # Eval forwards do not count toward the next update.
    layer.eval()
    layer(x)
    assert int(layer.load_since_update.sum()) == 0


@pytest.mark.parametrize("override, needle", [
    (["--moe.top_k=9"], "moe.top_k=9"),
    (["--parallel.ep=3"], "parallel.ep=3"),
    (["--moe.drop_tokens=true", "--moe.capacity_factor=0"], "moe.capacity_factor=0"),
    (["--moe.score_func=relu"], "moe.score_func"),
])
def test_bad_settings_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("tiny_dense", ["--model.pattern=moe", "--moe.num_experts=8", *override])
    load_config("tiny_dense", ["--model.pattern=moe", "--moe.num_experts=8", "--parallel.ep=4"])  # valid


def test_groups_scored_by_their_best_expert_or_their_two_best():
    """DeepSeek-V2's group_limited_greedy (a group's best score) and DeepSeek-V3's (its two best summed) pick
    different groups for the same scores."""
    from sparselm.model.moe.router import limit_to_groups

    # groups {0,1} and {2,3}: best of group 0 is 0.5, of group 1 is 0.4; sums 0.5 + 0.0 vs 0.4 + 0.4
    select = torch.tensor([[0.5, 0.0, 0.4, 0.4]])
    assert torch.isinf(limit_to_groups(select, 2, 1, "max")[0, 2:]).all()
    assert torch.isinf(limit_to_groups(select, 2, 1, "top2_sum")[0, :2]).all()
