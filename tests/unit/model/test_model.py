"""The plain-PyTorch model: shapes, causality, loss, init, tying."""
import pytest
import torch
import torch.nn.functional as F

from sparselm.config import load_config
from sparselm.model import build_model


def tiny_cfg(*extra):
    return load_config("tiny_dense", ["--model.vocab_size=128", "--model.d_model=64", "--model.n_layers=2",
                                      "--model.n_heads=4", *extra])


def test_causal_a_change_at_t_leaves_earlier_logits_unchanged():
    model = build_model(tiny_cfg())
    x = torch.randint(0, 128, (2, 24))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 128
    a, b = model(x), model(y)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_is_next_token_cross_entropy():
    model = build_model(tiny_cfg())
    x = torch.randint(0, 128, (2, 16))
    out = model(x[:, :-1], x[:, 1:])
    logits = model(x[:, :-1])
    ref = F.cross_entropy(logits.reshape(-1, 128), x[:, 1:].reshape(-1))
    assert torch.allclose(out.lm_loss, ref, atol=1e-6)
    assert torch.equal(out.loss, out.lm_loss + out.aux_loss)


def test_same_seed_same_weights_and_gqa():
    a, b = build_model(tiny_cfg()), build_model(tiny_cfg())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    gqa = build_model(tiny_cfg("--model.n_kv_heads=2"))
    assert gqa.layers[0].attn.k_proj.weight.shape == (32, 64)
    assert gqa(torch.randint(0, 128, (1, 8))).shape == (1, 8, 128)


def test_tied_embeddings_share_one_matrix():
    model = build_model(tiny_cfg("--model.tie_embeddings=true"))
    assert model.head.proj.weight is model.embed.weight
    assert model.num_params() == build_model(tiny_cfg()).num_params() - 128 * 64


def test_output_projections_get_scaled_init():
    model = build_model(tiny_cfg("--model.d_model=256"))
    std_in = model.layers[0].attn.q_proj.weight.std().item()
    std_out = model.layers[0].attn.o_proj.weight.std().item()
    assert std_in == pytest.approx(0.02, rel=0.05)
    assert std_out == pytest.approx(0.02 / 2, rel=0.05)  # 1/sqrt(2 * n_layers) with 2 layers
