"""Multi-head latent attention's attention core (model.attention=mla): queries, keys and values padded to one
head width give what SDPA's math kernel gives unpadded, causal, sliding and under every sparse pattern on each
CPU backend; backward keeps what ``mla_cost`` counts, with no [T, T] scores (the math kernel's fallback for
qk_head_dim != v_head_dim kept them)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparselm.config import load_config
from sparselm.model.mla import LatentAttention
from sparselm.model.mla_cost import latent_activations
from sparselm.model.sparse_attention.patterns import dense_mask

T = 40  # no head width, so a saved [T, T] tensor can only be scores


def attention(v_head_dim: int, window: int = 0, pattern: list[str] = ()) -> LatentAttention:
    """tiny_deepseek's attention (4 heads, q/k 16 + 8 channels) with ``v_head_dim``, weights drawn at std 0.2;
    ``pattern``: attention-section overrides (a sparse pattern and its backend)."""
    cfg = load_config("tiny_deepseek", ["--model.d_model=64", "--model.n_heads=4", f"--model.max_seq_len={T}",
                                        f"--data.seq_len={T}", f"--model.v_head_dim={v_head_dim}", *pattern])
    m = LatentAttention(cfg.model, window=window, acfg=cfg.attention)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    m.mcfg = cfg.model
    return m


def unpadded(m: LatentAttention, x: torch.Tensor) -> torch.Tensor:
    """The same attention with SDPA's math kernel on the unpadded widths (transformers' eager computation)."""
    b, t, _ = x.shape
    q_nope, q_rot = m.queries(x).split([m.nope, m.rope], dim=-1)
    k_nope, v, k_rot = m.keys_values(x)
    q = torch.cat([q_nope, m.rotary(q_rot)], dim=-1)
    k = torch.cat([k_nope, m.rotary(k_rot).expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
    lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    mask = (lag >= 0) & ((lag < m.window) if m.window else True)
    if m.spec is not None:
        mask = dense_mask(m.spec, t, t, x.device)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=m.scale)
    return m.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("v_head_dim,window", [(16, 0), (16, 24), (32, 0), (24, 0)])
def test_padded_heads_give_the_unpadded_attention(v_head_dim, window):
    """v narrower than q/k (DeepSeek's 128 against 192), wider, and equal (tiny_deepseek's qk is 16 + 8)."""
    m = attention(v_head_dim, window)
    x = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = m(x)
    ref = unpadded(m, x)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


PATTERNS = {"sliding_window": ["--attention.window=12"], "strided": ["--attention.stride=8"],
            "fixed": ["--attention.stride=8", "--attention.summary=2"], "block_local": ["--attention.block=8"],
            "bigbird": ["--attention.block=8", "--attention.global_blocks=1", "--attention.random_blocks=1"]}


@pytest.mark.parametrize("backend", ["reference", "block_sparse"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_sparse_patterns_apply_to_the_latent_scores(pattern, backend):
    """Patterns choose keys by position: under each one (and each CPU backend) MLA equals the unpadded math
    SDPA with the pattern's dense mask, with its own softmax scale (values 32 wide: not the padded width's)."""
    m = attention(32, pattern=[f"--attention.pattern={pattern}", f"--attention.backend={backend}", *PATTERNS[pattern]])
    x = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m(x), unpadded(m, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v_head_dim", [16, 24, 32])
def test_backward_keeps_what_the_cost_model_counts_and_no_scores(v_head_dim):
    m = attention(v_head_dim)
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    x = torch.randn(1, T, 64, requires_grad=True)
    saved: dict[int, torch.Tensor] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights | {x.untyped_storage().data_ptr()}:
            saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        m(x)
    assert not [t.shape for t in saved.values() if t.dim() >= 2 and t.shape[-2:] == (T, T)]
    per_token = sum(t.untyped_storage().nbytes() for t in saved.values()) / 4 / T
    assert per_token == pytest.approx(latent_activations(m.mcfg, 1), rel=0.02)
