"""Exact product-key top-k (Lample et al. 2019).

A query half scored against n_sub sub-keys gives n_sub scores; the full key (i, j) scores
s1[i] + s2[j].  If (i, j) is in the top-k of all n_sub**2 sums, i is in the top-k of s1 (otherwise k
rows i' beat i for the same j) and j in the top-k of s2, so the top-k over the k x k candidate sums
is the exact top-k over all keys.  Further, with both top-k lists sorted, the pair at ranks (a, b)
is beaten or tied by the a*b - 1 other pairs at ranks (<= a, <= b); only pairs with
(a + 1) * (b + 1) <= k (0-based ranks) can be among the top-k: about k * ln k candidates, not k * k.

The selection runs without autograd; the chosen scores are then gathered from the sub-key scores,
so the backward pass is two small scatters instead of going through three top-k operations.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _candidate_ranks(knn: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) of the two sorted top-knn lists with (a + 1) * (b + 1) <= knn (cached per device:
    no host-to-device copy per forward)."""
    pairs = [(a, b) for a in range(knn) for b in range(knn // (a + 1))]
    a, b = zip(*pairs)
    return torch.tensor(a, device=device), torch.tensor(b, device=device)


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` product keys per head.

    query: [n, heads, k_dim]; keys: [heads, 2, n_sub, k_dim // 2] (sub-key sets of the two halves).
    Returns (scores, slots), both [n, heads, knn], sorted by descending score; slot = i * n_sub + j.
    """
    n, heads, k_dim = query.shape
    n_sub = keys.shape[2]
    q = query.view(n, heads * 2, k_dim // 2).transpose(0, 1)  # [heads * 2, n, half]
    sub = torch.bmm(q, keys.flatten(0, 1).transpose(1, 2))  # [heads * 2, n, n_sub]: both halves, one matmul
    with torch.no_grad():
        top, idx = sub.topk(knn, dim=-1)  # sorted, [heads * 2, n, knn]
        top, idx = top.view(heads, 2, n, knn), idx.view(heads, 2, n, knn)
        ra, rb = _candidate_ranks(knn, query.device)
        candidates = top[:, 0].index_select(-1, ra) + top[:, 1].index_select(-1, rb)
        _, pos = candidates.topk(knn, dim=-1)  # [heads, n, knn]
        i = idx[:, 0].gather(-1, ra[pos])
        j = idx[:, 1].gather(-1, rb[pos])
    # The chosen scores, differentiably: one gather (one scatter in backward) for both halves.
    chosen = sub.view(heads, 2, n, n_sub).gather(-1, torch.stack([i, j], dim=1))
    scores = chosen[:, 0] + chosen[:, 1]
    return scores.transpose(0, 1), (i * n_sub + j).transpose(0, 1)
