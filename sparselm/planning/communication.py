"""Bytes one rank sends per optimizer step, by collective and group, under ring algorithms: tensor-parallel
all-reduces (per block from its kind's cost model, plus expert outputs under expert TP and the
vocabulary-parallel ends), expert-parallel all-to-alls, context-parallel (Ulysses) all-to-alls, pipeline
send/recv, the data-parallel gradient collectives of each ZeRO stage (over data x context-parallel ranks)
and the tied embedding's all-reduce."""
from __future__ import annotations

from sparselm.model.registry import block_cost


def bus_bytes(size: float, n: int, kind: str) -> float:
    """Bytes one rank sends for a collective on ``size`` bytes over ``n`` ranks with ring algorithms:
    2 (n - 1) / n x size for 'all-reduce', (n - 1) / n x size for the others (all-gather, reduce-scatter,
    all-to-all); 0 for a group of one."""
    if n <= 1:
        return 0.0
    return size * (2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n)


def communication_bytes(cfg, layout, stages, zero_stage: int, w: int, a: int, m_batches: int, tokens: int) -> dict:
    """Bytes one rank of the busiest stage of ``stages`` sends per optimizer step, by collective and group
    ('all-reduce tp', 'all-to-all ep', 'all-to-all cp', 'send/recv pp', 'all-reduce dp', 'reduce-scatter dp',
    'all-gather dp', 'all-reduce tied'); ``w``/``a``: bytes of a weight / an activation, ``tokens`` per
    micro-batch on one rank (its context-parallel piece).  Ulysses sends q, k, v and the output of every
    attention layer through an all-to-all, forward and backward (kv heads fewer than cp replicated first);
    'allgather' gathers every layer's keys and values and all-reduces their gradients (counted under the same
    'all-to-all cp' key: the context-parallel group's traffic)."""
    kinds = cfg.model.layer_kinds()
    m, d, t, cp = cfg.model, cfg.model.d_model, layout.tp, layout.cp
    if cfg.parallel.cp_method == "allgather":  # keys and values gathered; their gradients all-reduced back
        kv = tokens * cp * 2 * m.kv_heads / t * m.head_width * a
        per_layer = bus_bytes(kv, cp, "all-gather") + bus_bytes(kv, cp, "all-reduce")
    else:  # Ulysses: q, k, v and the output through an all-to-all, forward and backward
        ulysses = tokens * m.head_width * a * (2 * m.n_heads / t + 2 * max(m.kv_heads / t, cp))
        per_layer = 2 * bus_bytes(ulysses, cp, "all-to-all")
    best = {}
    for s in stages:
        c = {"all-reduce tp": 0.0, "all-to-all ep": 0.0, "all-to-all cp": 0.0, "send/recv pp": 0.0,
             "all-reduce dp": 0.0, "reduce-scatter dp": 0.0, "all-gather dp": 0.0, "all-reduce tied": 0.0}
        act = tokens * d * a
        for i in s.layers:
            cost = block_cost(kinds[i])
            c["all-to-all cp"] += per_layer
            c["all-reduce tp"] += 2 * cost.tp_all_reduces() * bus_bytes(act, t, "all-reduce")  # forward and backward
            copies = cost.routed_copies(cfg)
            if copies:
                routed = act * copies
                if t > 1:
                    c["all-reduce tp"] += 2 * bus_bytes(routed, t, "all-reduce")
                c["all-to-all ep"] += 4 * bus_bytes(routed, layout.ep, "all-to-all")  # dispatch, combine; x2 backward
        if s.first or s.last:
            c["all-reduce tp"] += 2 * bus_bytes(act, t, "all-reduce")
        c = {key: value * m_batches for key, value in c.items()}
        if layout.pp > 1:
            c["send/recv pp"] = 2 * act * m_batches * (1 if (s.first or s.last) else 2) / 2
            if s.first or s.last:
                tied = cfg.model.tie_embeddings and s.by_kind["embedding"]
                c["all-reduce tied"] = bus_bytes(w * cfg.model.vocab_size / t * d, 2, "all-reduce") if tied else 0.0
        dpcp = layout.dp * layout.cp
        dense, expert, edp = (s.params - s.expert) * w, s.expert * w, dpcp // layout.ep
        for size, n in ((dense, dpcp), (expert, edp)):
            if zero_stage == 0:
                c["all-reduce dp"] += bus_bytes(size, n, "all-reduce")
            elif zero_stage in (1, 2):
                c["reduce-scatter dp"] += bus_bytes(size, n, "reduce-scatter") * (m_batches if zero_stage == 2 else 1)
                c["all-gather dp"] += bus_bytes(size, n, "all-gather")
            else:
                c["reduce-scatter dp"] += bus_bytes(size, n, "reduce-scatter") * m_batches
                c["all-gather dp"] += 2 * bus_bytes(size, n, "all-gather") * m_batches
        if sum(c.values()) >= sum(best.values()):
            best = c
    return {k: int(v) for k, v in best.items()}


def intra_node(layout, axis: str, per_node: int) -> bool:
    """Whether every group of ``axis`` lies inside one node of ``per_node`` consecutive ranks."""
    return all(len({r // per_node for r in group}) == 1 for group in layout.groups(axis))
