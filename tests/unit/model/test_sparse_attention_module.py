"""SparseAttention as a layer: plain attention when N = 0, causality under every pattern, the
persistent memory's init, and the allattn block inside the model."""
import warnings

import pytest
import torch

from sparselm.config import ModelConfig, load_config
from sparselm.model.attention import Attention
from sparselm.model.registry import default_attention
from sparselm.model.sparse_attention import AttentionConfig, SparseAttention
from sparselm.model.transformer import build_model
from test_sparse_attention_patterns import PATTERNS

MCFG = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=320)
SMALL = dict(window=40, stride=24, summary=4, block=32, global_blocks=1, window_blocks=2, random_blocks=2)


def layer(pattern="causal", slots=0, backend="reference", seed=0) -> SparseAttention:
    torch.manual_seed(seed)
    return SparseAttention(MCFG, AttentionConfig(pattern=pattern, backend=backend, **SMALL), slots)


def x_input(t=300, seed=1):
    return torch.randn(2, t, MCFG.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern, backend", [("causal", "reference"), ("sliding_window", "reference"), ("sliding_window", "block_sparse")])
def test_no_memory_equals_plain_attention(pattern, backend):
    t = 40  # the window covers the whole sequence, so the sparse path must reproduce dense attention
    sparse = layer(pattern, 0, backend)
    assert sparse.memory() is None and not any("memory" in n for n, _ in sparse.named_parameters())
    plain = Attention(MCFG)
    plain.load_state_dict(sparse.state_dict())
    x = x_input(t).requires_grad_()
    out_s, out_p = sparse(x), plain(x)
    torch.testing.assert_close(out_s, out_p, rtol=1e-5, atol=1e-6)
    g_s, = torch.autograd.grad(out_s.square().sum(), x)
    g_p, = torch.autograd.grad(out_p.square().sum(), x)
    torch.testing.assert_close(g_s, g_p, rtol=1e-5, atol=1e-6)


def test_memory_is_seen_by_every_position():
    attn = layer("block_local", slots=8)
    x = x_input(64)
    before = attn(x)
    with torch.no_grad():
        attn.memory_v.add_(1.0)
    changed = (attn(x) - before).abs().amax(dim=(0, 2))
    assert (changed > 1e-4).all(), "a query does not see the persistent memory"


@pytest.mark.parametrize("backend", ["reference", "block_sparse"])
def test_memory_lookup_does_not_depend_on_position(backend):
    """With a window of one token a query sees itself (relative distance 0) and the memory, so the same
    input at every position must give the same output: rotary must not reach the memory scores."""
    torch.manual_seed(0)
    attn = SparseAttention(MCFG, AttentionConfig(pattern="sliding_window", window=1, backend=backend), 16)
    x = torch.randn(1, 1, MCFG.d_model).expand(2, 200, -1)
    out = attn(x)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "block_sparse", "flex"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_no_query_sees_the_future(pattern, backend):
    attn = layer(pattern, slots=6, backend=backend)
    x, cut = x_input(), 150
    y = x.clone()
    y[:, cut:] += torch.randn_like(y[:, cut:])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_x, out_y = attn(x), attn(y)
    assert torch.equal(out_x[:, :cut], out_y[:, :cut]), "an output before the perturbation changed"
    assert not torch.allclose(out_x[:, cut:], out_y[:, cut:]), "the perturbation must reach later outputs"
    # A prefix alone is attended as inside the longer sequence (BigBird's random blocks included).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(attn(x[:, :cut]), out_x[:, :cut], rtol=1e-5, atol=1e-6)


def test_default_attention_follows_the_config():
    cfg = load_config("tiny_dense")
    assert type(default_attention(cfg, 0)) is Attention
    cfg = load_config("tiny_dense", ["--attention.pattern=sliding_window", "--attention.window=32"])
    attn = default_attention(cfg, 0)
    assert isinstance(attn, SparseAttention) and attn.spec.window == 32 and attn.memory() is None


def allattn_model(*overrides):
    cfg = load_config("tiny_allattn", ["--model.n_layers=2", *overrides])
    cfg.model.vocab_size = 256
    return cfg, build_model(cfg)


def test_allattn_replaces_the_feed_forward_at_equal_size():
    cfg, model = allattn_model("--attention.persistent_slots=0")  # 0: as many slots as the SwiGLU's parameters
    dense_cfg = load_config("tiny_allattn", ["--model.n_layers=2", "--model.pattern=dense"])
    dense_cfg.model.vocab_size = 256
    dense = build_model(dense_cfg)
    assert all(block.ffn is None and block.attn.memory_slots > 0 for block in model.layers)
    # Equal but for the feed-forward's norm (d_model weights per layer) and slot rounding.
    slack = cfg.model.n_layers * (cfg.model.d_model + 2 * cfg.model.kv_heads * cfg.model.head_width)
    assert abs(model.num_params() - dense.num_params()) <= slack
    logits = model(torch.randint(0, 256, (2, cfg.data.seq_len)))
    assert logits.shape == (2, cfg.data.seq_len, 256) and logits.isfinite().all()


def test_tiny_allattn_preset_has_the_size_of_tiny_dense():
    sizes = []
    for preset in ("tiny_allattn", "tiny_dense"):
        cfg = load_config(preset)
        cfg.model.vocab_size = 256
        sizes.append(build_model(cfg).num_params())
    assert sizes[0] == sizes[1]


def test_persistent_memory_keeps_the_papers_init_inside_the_model():
    cfg, model = allattn_model("--attention.persistent_slots=2048")
    attn = model.layers[0].attn
    # The model's normal(0, init_std) pass must not overwrite it: U_k ~ N(0, 1/d_h), U_v ~ N(0, 1/N).
    assert attn.memory_k.std().item() == pytest.approx(cfg.model.head_width**-0.5, rel=0.05)
    assert attn.memory_v.std().item() == pytest.approx(2048**-0.5, rel=0.05)
    keys, values = attn.memory()
    assert keys.std().item() == pytest.approx(1.0, rel=0.05) and values.std().item() == pytest.approx(1.0, rel=0.05)


def test_persistent_memory_has_its_own_learning_rate_and_keeps_weight_decay():
    from sparselm.training.optim import param_groups

    cfg, model = allattn_model("--attention.persistent_slots=16", "--attention.memory_lr_scale=0.25")
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    memory = groups["persistent_memory"]
    assert memory["lr_scale"] == 0.25 and memory["weight_decay"] == cfg.optim.weight_decay > 0
    attn = model.layers[0].attn
    assert {id(p) for p in memory["params"]} >= {id(attn.memory_k), id(attn.memory_v)}
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
