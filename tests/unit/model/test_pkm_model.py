"""PKM in the model: start-up checks, init, optimizer group, shared value tables, logged metrics."""
import pytest
import torch

from support.pkm_reference import pkm_cfg
from sparselm.config import ConfigError
from sparselm.model import build_model
from sparselm.model.pkm import ProductKeyMemory
from sparselm.training.optim import param_groups


@pytest.mark.parametrize("override, words", [
    (["--pkm.n_keys=1000"], ["pkm.n_keys=1000", "perfect square"]),
    (["--pkm.knn=17"], ["pkm.knn=17", "16 sub-keys"]),
    (["--pkm.k_dim=15"], ["pkm.k_dim=15", "even"]),
    (["--parallel.tp=2", "--pkm.v_dim=33"], ["33", "parallel.tp=2"]),
    (["--pkm.share_values=0,1"], ["layer 0", "not a PKM layer", "[1]"]),
    (["--pkm.share_values=1,3"], ["layer 3", "not a PKM layer"]),
    (["--pkm.share_values=[1]"], ["at least two"]),
    (["--pkm.query_norm=rms"], ["pkm.query_norm", "layernorm"]),
    (["--pkm.share_values=1,3", "--model.n_layers=4", "--parallel.pp=2"], ["pkm.share_values", "parallel.pp=1"]),
])
def test_bad_pkm_settings_fail_at_startup(override, words):
    with pytest.raises(ConfigError) as err:
        pkm_cfg(*override)
    for w in words:
        assert w in str(err.value)


def test_special_init_survives_the_model_init():
    cfg = pkm_cfg()
    mem = build_model(cfg).layers[1].ffn
    assert isinstance(mem, ProductKeyMemory)
    assert mem.values.std().item() == pytest.approx(32 ** -0.5, rel=0.05)  # not the model's 0.02
    bound = (16 // 2) ** -0.5
    assert mem.keys.abs().max().item() <= bound and mem.keys.abs().max().item() > 0.9 * bound  # uniform keys
    assert mem.query_weight.std().item() == pytest.approx(32 ** -0.5, rel=0.1)


def test_values_get_their_own_optimizer_group():
    cfg = pkm_cfg("--pkm.value_lr_scale=4", "--pkm.value_weight_decay=0.01", "--model.pattern=pkm_ffn,pkm")
    model = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    values = groups["pkm_values"]
    assert values["lr_scale"] == 4 and values["weight_decay"] == 0.01
    assert {id(p) for p in values["params"]} == {id(model.layers[0].ffn.memory.values), id(model.layers[1].ffn.values)}
    assert all(id(p) not in {id(q) for q in values["params"]} for g in groups.values() if g is not values for p in g["params"])


def test_shared_value_table_is_one_parameter_held_by_the_model():
    shared = build_model(pkm_cfg("--model.pattern=pkm", "--model.n_layers=3", "--pkm.share_values=0,2"))
    alone = build_model(pkm_cfg("--model.pattern=pkm", "--model.n_layers=3"))
    # bound when the model is built (a layer of pkm.share_values reads its owner's table)
    owner, reader = shared.layers[0].ffn, shared.layers[2].ffn
    assert reader.values is owner.values and shared.layers[1].ffn.values is not owner.values
    assert shared.num_params() == alone.num_params() - 256 * 32
    # Same weights, but layer 2 holds its own copy of the table: the shared gradient is the sum.
    state = shared.state_dict()
    alone.load_state_dict({**state, "layers.2.ffn.values": state["layers.0.ffn.values"]})
    x = torch.randint(0, 128, (2, 8))
    loss_shared = shared(x[:, :-1], x[:, 1:]).loss
    loss_alone = alone(x[:, :-1], x[:, 1:]).loss
    assert torch.equal(loss_shared, loss_alone)
    loss_shared.backward()
    loss_alone.backward()
    both = alone.layers[0].ffn.values.grad + alone.layers[2].ffn.values.grad
    torch.testing.assert_close(owner.values.grad, both)
    assert not torch.allclose(both, alone.layers[0].ffn.values.grad)


def test_usage_metrics_are_summarised_per_layer_at_each_step_end():
    from sparselm.training.steps import after_optimizer_step

    model = build_model(pkm_cfg()).train()
    x = torch.randint(0, 128, (2, 9))
    model(x[:, :-1], x[:, 1:])
    assert not any("pkm" in k for k in model.metrics())  # usage is a per-step figure, not per forward
    metrics = after_optimizer_step(enumerate(model.layers))  # what the trainer does after each optimizer step
    assert set(metrics) == {"layer1/pkm_read_frac", "layer1/pkm_usage_kl", "layer1/pkm_dead_slots"}
    assert 0 < metrics["layer1/pkm_read_frac"].item() <= 2 * 8 * 2 * 4 / 256
    assert int(model.layers[1].ffn.usage.step) == 1
