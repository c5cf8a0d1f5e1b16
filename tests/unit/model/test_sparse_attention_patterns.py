"""Sparse attention patterns: masks against the papers' definitions written out naively, and config errors."""
import pytest
import torch

from sparselm.config import ConfigError, load_config
from sparselm.model.sparse_attention.patterns import (
    PatternSpec, dense_mask, full_mask_mod, materialize, random_block_table,
)

SPEC = PatternSpec(name="causal", window=20, stride=12, summary=3, block=16, global_blocks=1, window_blocks=2, random_blocks=2, seed=7)
PATTERNS = ["causal", "sliding_window", "strided", "fixed", "block_local", "bigbird"]


def spec(name: str, **kw) -> PatternSpec:
    return PatternSpec(**{**SPEC.__dict__, "name": name, **kw})


def naive_allowed(s: PatternSpec, i: int, j: int) -> bool:
    """Which key j query i sees, straight from the papers' set definitions (bigbird's random part excluded)."""
    if j > i:
        return False
    if s.name == "causal":
        return True
    if s.name == "sliding_window":
        return i - j < s.window
    if s.name == "strided":  # Child et al.: A1 = {j: i - j < l}, A2 = {j: (i - j) mod l = 0}
        return i - j < s.stride or (i - j) % s.stride == 0
    if s.name == "fixed":  # A1 = {j: floor(j/l) = floor(i/l)}, A2 = {j: j mod l in {l - c, ..., l}}
        return j // s.stride == i // s.stride or j % s.stride >= s.stride - s.summary
    if s.name == "block_local":
        return j // s.block == i // s.block
    if s.name == "bigbird":
        return j // s.block < s.global_blocks or i // s.block - j // s.block < s.window_blocks
    raise AssertionError(s.name)


def naive_mask(s: PatternSpec, t: int) -> torch.Tensor:
    return torch.tensor([[naive_allowed(s, i, j) for j in range(t)] for i in range(t)])


@pytest.mark.parametrize("name", PATTERNS)
def test_mask_matches_definition(name):
    s, t = spec(name), 100  # 100 is not a multiple of the block: partial last block
    got = dense_mask(s, t, t, torch.device("cpu"))
    want = naive_mask(s, t)
    if name == "bigbird":
        rand = random_block_table(s, -(-t // s.block), "cpu")
        blocks = torch.arange(t) // s.block
        want |= rand[blocks[:, None], blocks[None, :]] & torch.ones(t, t, dtype=torch.bool).tril()
    assert torch.equal(got, want)
    assert got.diagonal().all(), "every query must see itself (no empty softmax row)"
    assert not got.triu(1).any(), "a query sees a future key"


def test_memory_columns_always_visible():
    t, n = 40, 5
    mask = materialize(full_mask_mod(spec("block_local"), t, t + n, "cpu"), t, t + n, "cpu")
    assert mask[:, t:].all()
    assert torch.equal(mask[:, :t], dense_mask(spec("block_local"), t, t, torch.device("cpu")))


def test_bigbird_random_blocks():
    s = spec("bigbird", block=8, global_blocks=1, window_blocks=2, random_blocks=3)
    table = random_block_table(s, 20, "cpu")
    for i in range(20):
        candidates = set(range(s.global_blocks, i - s.window_blocks + 1))
        picked = set(table[i].nonzero().flatten().tolist())
        assert picked <= candidates  # only earlier blocks not already covered by global/window
        assert len(picked) == min(s.random_blocks, len(candidates))
    assert torch.equal(table, random_block_table(s, 20, "cpu")), "same seed, same blocks"
    assert torch.equal(table[:10, :10], random_block_table(s, 10, "cpu")), "rows must not depend on the length"
    other = random_block_table(spec("bigbird", block=8, random_blocks=3, seed=8), 20, "cpu")
    assert not torch.equal(table, other), "the seed must matter"


def _cfg(*overrides):
    return load_config("tiny_dense", ["--data.seq_len=128", "--model.max_seq_len=256", *overrides])


@pytest.mark.parametrize("overrides, words", [
    (["--attention.pattern=sliding_window", "--attention.window=129"], ["attention.window=129", "data.seq_len=128"]),
    (["--attention.pattern=block_local", "--attention.block=48"], ["attention.block=48", "does not divide"]),
    (["--attention.pattern=bigbird", "--attention.block=100"], ["attention.block=100", "does not divide"]),
    (["--attention.pattern=longformer"], ["attention.pattern='longformer'", "sliding_window"]),
    (["--attention.pattern=strided", "--attention.stride=0"], ["attention.stride=0"]),
    (["--attention.pattern=fixed", "--attention.stride=16", "--attention.summary=17"], ["attention.summary=17"]),
    (["--attention.backend=triton"], ["attention.backend='triton'"]),
    (["--model.pattern=allattn", "--parallel.tp=3", "--model.n_heads=4"], ["parallel.tp=3"]),
])
def test_bad_config_is_a_clear_error(overrides, words):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    for word in words:
        assert word in str(err.value)


def test_good_configs_pass():
    _cfg("--attention.pattern=sliding_window", "--attention.window=128")
    _cfg("--attention.pattern=bigbird", "--attention.block=32", "--model.pattern=allattn")
    _cfg("--attention.pattern=fixed", "--attention.stride=32", "--attention.summary=4")
