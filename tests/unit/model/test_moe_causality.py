"""MoE routing that neither sees the future nor depends on how the batch is cut.

Capacity dropping in probability order over a micro-batch let a later token push an earlier one out of an
expert (training saw the future) and let a sequence's batch-mates change its output; the balance loss and
capacity taken per micro-batch made the gradients depend on the micro-batch size, hence on the layout."""
import contextlib
import itertools

import pytest
import torch

from sparselm.config import load_config
from sparselm.model import build_model

ROUTERS = {  # score_func, top_k, shared experts, bias balancing
    "softmax_top2": ["--moe.score_func=softmax", "--moe.top_k=2"],
    "sigmoid_top1_shared_bias": ["--moe.score_func=sigmoid", "--moe.top_k=1", "--moe.num_shared_experts=1",
                                 "--moe.bias_balancing=true", "--moe.renormalize=false"],
    "softmax_top1": ["--moe.score_func=softmax", "--moe.top_k=1", "--moe.renormalize=false"],
}
CAPACITY = {"dropless": ["--moe.drop_tokens=false"],
            "cf1": ["--moe.drop_tokens=true", "--moe.capacity_factor=1.0"],
            "cf0.5": ["--moe.drop_tokens=true", "--moe.capacity_factor=0.5"]}
SCOPES = ["sequence", "micro_batch"]


def _model(*overrides):
    cfg = load_config("tiny_mixed", ["--model.vocab_size=320", *overrides])
    model = build_model(cfg, seed=3)
    return model.train(), cfg  # capacity applies in training and evaluation alike; train mode is the harder case


def _ids(seed=0, batch=4):
    return torch.randint(0, 256, (batch, 32), generator=torch.Generator().manual_seed(seed))


def _dropped(model) -> float:
    return float(model.metrics()["layer1/dropped_frac"])


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decisions(model, ids, monkeypatch):
    """Output of ``model(ids)`` and, per MoE layer, each assignment's expert and whether capacity kept it,
    as [B, T, k] tensors: what a later token must not change for an earlier one."""
    import sparselm.model.moe.layer as moe_layer

    seen = []
    original = moe_layer.plan_dispatch

    def recording(experts, probs, *args, **kwargs):
        plan = original(experts, probs, *args, **kwargs)
        kept = torch.zeros(experts.numel(), dtype=torch.bool).index_fill_(0, plan.order, True)
        seen.append((experts.reshape(ids.shape + (-1,)), kept.view(ids.shape + (-1,))))
        return plan

    monkeypatch.setattr(moe_layer, "plan_dispatch", recording)
    with torch.no_grad():
        out = model(ids)
    monkeypatch.setattr(moe_layer, "plan_dispatch", original)
    return out, seen


@pytest.mark.parametrize("router,capacity,scope", list(itertools.product(ROUTERS, CAPACITY, SCOPES)))
def test_no_moe_setting_sees_the_future(router, capacity, scope, monkeypatch):
    """Changing tokens 16.. changes neither the experts chosen for tokens ..15 nor which of their assignments
    capacity keeps; their outputs then agree up to float rounding (the experts' group sizes, hence the
    matmuls' summation order, may change), at any thread count."""
    model, _ = _model(*ROUTERS[router], *CAPACITY[capacity], f"--moe.balance_scope={scope}")
    ids = _ids()
    changed = ids.clone()
    changed[:, 16:] = _ids(seed=1)[:, 16:]
    for threads in (1, 2, 3):
        with _threads(threads):
            before, routed_before = _decisions(model, ids, monkeypatch)
            dropped = _dropped(model)
            after, routed_after = _decisions(model, changed, monkeypatch)
        if capacity != "dropless":
            assert dropped > 0, "the capacity must actually drop tokens for this test to mean anything"
        assert routed_before and len(routed_before) == len(routed_after)
        for (experts_b, kept_b), (experts_a, kept_a) in zip(routed_before, routed_after):
            assert torch.equal(experts_b[:, :16], experts_a[:, :16]), f"experts of earlier tokens changed ({threads} threads)"
            assert torch.equal(kept_b[:, :16], kept_a[:, :16]), f"drops of earlier tokens changed ({threads} threads)"
        torch.testing.assert_close(after[:, :16], before[:, :16], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{m} ({threads} threads)")


def test_probability_drop_policy_is_not_causal_as_documented():
    model, _ = _model("--moe.drop_tokens=true", "--moe.capacity_factor=1.0", "--moe.drop_policy=probability")
    ids = _ids()
    changed = ids.clone()
    changed[:, 16:] = _ids(seed=1)[:, 16:]
    with torch.no_grad():
        assert not torch.equal(model(ids)[:, :16], model(changed)[:, :16])


@pytest.mark.parametrize("capacity", ["cf1", "cf0.5"])
def test_a_sequences_output_does_not_depend_on_its_batch_mates(capacity):
    model, _ = _model(*CAPACITY[capacity])
    ids = _ids()
    others = ids.clone()
    others[1:] = _ids(seed=2)[1:]
    with torch.no_grad():
        # equal up to the rounding of matmuls over other group sizes
        torch.testing.assert_close(model(ids)[0], model(others)[0], rtol=1e-6, atol=1e-6)
        # alone, as in batch-1 generation (equal up to the matmuls' rounding at another batch size)
        torch.testing.assert_close(model(ids)[0], model(ids[:1])[0], rtol=0, atol=1e-5)


def _step(model, batch, micro):
    """Loss, aux loss and gradients of one optimizer step over ``batch`` accumulated in micro-batches."""
    model.zero_grad()
    n = len(batch) // micro
    lm = aux = 0.0
    for chunk in batch.split(micro):
        out = model(chunk[:, :-1], chunk[:, 1:])
        (out.loss / n).backward()
        lm, aux = lm + out.lm_loss.item() / n, aux + out.aux_loss.item() / n
    return lm, aux, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("capacity", ["dropless", "cf1"])
def test_default_settings_give_the_same_step_at_every_micro_batch_size(capacity):
    model, _ = _model(*CAPACITY[capacity], "--moe.aux_loss_coef=0.1")
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(5))
    lm8, aux8, grads8 = _step(model, batch, 8)
    for micro in (4, 2, 1):
        lm, aux, grads = _step(model, batch, micro)
        assert lm == pytest.approx(lm8, rel=1e-6) and aux == pytest.approx(aux8, rel=1e-6), micro
        for name, g in grads.items():
            torch.testing.assert_close(g, grads8[name], rtol=1e-4, atol=1e-7, msg=f"{name} at micro {micro}")


def test_micro_batch_scope_is_the_explicit_layout_dependent_option():
    model, _ = _model("--moe.balance_scope=micro_batch", "--moe.aux_loss_coef=0.1")
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(5))
    assert _step(model, batch, 8)[1] != pytest.approx(_step(model, batch, 2)[1], rel=1e-6)


@pytest.mark.parametrize("override, needle", [
    ("--moe.drop_policy=random", "moe.drop_policy='random'"),
    ("--moe.balance_scope=batch", "moe.balance_scope='batch'"),
])
def test_bad_routing_settings_are_named(override, needle):
    from sparselm.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config("tiny_mixed", [override])
