"""Exact product-key top-k (Lample et al. 2019).

A query half scored against n_sub sub-keys gives n_sub scores; the full key (i, j) scores
s1[i] + s2[j].  If (i, j) is in the top-k of all n_sub**2 sums, i is in the top-k of s1 (otherwise k
rows i' beat i for the same j) and j in the top-k of s2, so the top-k over the k x k candidate sums
is the exact top-k over all keys.
"""
from __future__ import annotations

import torch


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` product keys per head.

    query: [n, heads, k_dim]; keys: [heads, 2, n_sub, k_dim // 2] (sub-key sets of the two halves).
    Returns (scores, slots), both [n, heads, knn], sorted by descending score; slot = i * n_sub + j.
    """
    n_sub = keys.shape[2]
    q1, q2 = query.chunk(2, dim=-1)
    s1 = torch.einsum("nhd,hsd->nhs", q1, keys[:, 0])
    s2 = torch.einsum("nhd,hsd->nhs", q2, keys[:, 1])
    t1, i1 = s1.topk(knn, dim=-1)
    t2, i2 = s2.topk(knn, dim=-1)
    candidates = (t1.unsqueeze(-1) + t2.unsqueeze(-2)).flatten(-2)  # [n, heads, knn * knn]
    scores, pos = candidates.topk(knn, dim=-1)
    slots = i1.gather(-1, pos // knn) * n_sub + i2.gather(-1, pos % knn)
    return scores, slots
