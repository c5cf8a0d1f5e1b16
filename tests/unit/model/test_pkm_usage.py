"""Live slot-usage statistics on hand-made access patterns."""
import math

import pytest
import torch

from support.pkm_reference import pkm_cfg
from sparselm.model.pkm import ProductKeyMemory, SlotUsage


def _read(usage, slots, weights):
    usage.record(torch.tensor(slots), torch.tensor(weights))


def test_window_kl_and_dead_slots_follow_the_steps():
    u = SlotUsage(8, window=2, dead_after=3)  # EMA decay 1 - 1/2
    assert {k: v.item() for k, v in u.summary().items()} == {"pkm_read_frac": 0.0, "pkm_usage_kl": 0.0,
                                                             "pkm_dead_slots": 8.0}
    _read(u, [0, 1], [0.5, 0.5])
    m = u.summary()
    assert m["pkm_read_frac"].item() == 2 / 8
    assert m["pkm_usage_kl"].item() == pytest.approx(math.log(4))  # half the mass on each of 2 of 8 slots
    assert m["pkm_dead_slots"].item() == 6
    u.after_optimizer_step()
    _read(u, [2], [1.0])
    m = u.summary()
    p = torch.tensor([0.25, 0.25, 1.0]) / 1.5
    assert m["pkm_read_frac"].item() == 3 / 8
    assert m["pkm_usage_kl"].item() == pytest.approx(math.log(8) + (p * p.log()).sum().item(), rel=1e-6)
    assert m["pkm_dead_slots"].item() == 5
    expected = [(1 / 8, 5), (0.0, 7), (0.0, 8)]  # steps 2, 3, 4 with no reads: the window and dead_after pass
    for frac, dead in expected:
        u.after_optimizer_step()
        m = u.summary()
        assert (m["pkm_read_frac"].item(), m["pkm_dead_slots"].item()) == (frac, dead)


def test_uniform_use_has_zero_kl_and_repeats_accumulate():
    u = SlotUsage(6, window=10, dead_after=10)
    _read(u, [0, 1, 2, 3, 4, 5], [1.0] * 6)
    assert u.summary()["pkm_usage_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert u.summary()["pkm_read_frac"].item() == 1.0
    _read(u, [5, 5, 5], [1.0, 1.0, 1.0])  # one slot read three more times in the same step
    p = torch.tensor([1.0] * 5 + [4.0]) / 9
    assert u.summary()["pkm_usage_kl"].item() == pytest.approx(math.log(6) + (p * p.log()).sum().item(), rel=1e-6)


def test_state_resumes_from_state_dict_and_stays_fp32_under_bf16():
    u = SlotUsage(16, window=4, dead_after=8)
    for step in range(5):
        _read(u, [step, step + 1], [0.7, 0.3])
        u.after_optimizer_step()
    state = u.state_dict()
    assert set(state) == {"step", "last_read", "mass"}  # pending is zero at every step end
    v = SlotUsage(16, window=4, dead_after=8)
    v.load_state_dict({k: t.float() for k, t in state.items()})  # checkpoints store every tensor as fp32
    for name, value in u.summary().items():
        assert torch.equal(value, v.summary()[name]), name
    v.bfloat16()
    assert v.mass.dtype == v.pending.dtype == torch.float32 and v.last_read.dtype == torch.long


def test_memory_layer_records_in_training_mode_only():
    cfg = pkm_cfg("--pkm.n_keys=64", "--pkm.knn=2", "--pkm.heads=1")
    mem = ProductKeyMemory(32, cfg.pkm)
    x = torch.randn(1, 3, 32)
    mem.eval()(x)
    assert int(mem.usage.pending.count_nonzero()) == 0
    mem.train()(x)
    reads = int(mem.usage.pending.count_nonzero())
    assert 2 <= reads <= 6  # 3 tokens x 1 head x knn 2, some possibly the same slot
    assert mem.usage.pending.sum().item() == pytest.approx(3.0)  # softmax weights: 1 per token and head
    mem.usage.after_optimizer_step()
    assert mem.usage.step_metrics["pkm_read_frac"].item() == reads / 64
    assert mem.usage.step_metrics["pkm_dead_slots"].item() == 64 - reads
