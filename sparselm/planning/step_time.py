"""Estimated seconds per optimizer step: the model's FLOPs from ``sparselm.planning.flops`` (every block kind
by its cost model, the attention mask counted exactly) and the FLOPs recomputation repeats, at mfu x peak
spread evenly over the GPUs, times (1 + the pipeline bubble of 1F1B, (pp - 1) / micro-batches: Narayanan et
al. 2021), plus each group's bytes over NVLink or the network (not overlapped unless ``overlap_dp``), plus CPU
Adam and PCIe under offload."""
from __future__ import annotations

from sparselm.planning.assumptions import Assumptions
from sparselm.planning.communication import intra_node
from sparselm.planning.flops import flop_counts, param_counts


def matmul_params_per_token(cfg) -> int:
    """Parameters one token multiplies by: ``param_counts(cfg).active`` less the embedding lookup when the
    embedding is not tied to the output projection."""
    m = cfg.model
    return param_counts(cfg).active - (0 if m.tie_embeddings else m.vocab_size * m.d_model)


def step_time(cfg, layout, stages, comm: dict, assume: Assumptions, m_batches: int, offload_opt: bool, w: int) -> dict:
    """{step_s, compute_s, bubble_fraction, comm_s (by group: tp, ep, pp, dp), offload_s, model_flops_per_step,
    recompute_flops_per_step, active_params} of one optimizer step of ``cfg`` on ``layout``; ``comm``: the
    bytes of ``communication.communication_bytes``, ``w`` bytes per weight."""
    counts = flop_counts(cfg)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops = counts.per_token * tokens
    recomputed = counts.recompute_per_token * tokens  # hardware FLOPs, not model FLOPs
    compute = (flops + recomputed) / layout.world_size / (assume.peak_tflops * 1e12 * assume.mfu)
    bubble = (layout.pp - 1) / m_batches if layout.pp > 1 else 0.0

    def bandwidth(axis: str) -> float:
        return (assume.nvlink_gbs if intra_node(layout, axis, assume.gpus_per_node) else assume.network_gbs) * 1e9

    comm_s = {"tp": comm["all-reduce tp"] / bandwidth("tp"), "ep": comm["all-to-all ep"] / bandwidth("ep"),
              "cp": comm["all-to-all cp"] / bandwidth("cp"),
              "pp": (comm["send/recv pp"] + comm["all-reduce tied"]) / bandwidth("pp"),
              "dp": (comm["all-reduce dp"] + comm["reduce-scatter dp"] + comm["all-gather dp"]) / bandwidth("dpcp")
              * (1 - assume.overlap_dp)}
    offload = 0.0
    if offload_opt:
        s = max(stages, key=lambda s: s.params)
        dpcp = layout.dp * layout.cp
        part = (s.params - s.expert) / dpcp + s.expert / (dpcp // layout.ep)
        offload = part / (assume.cpu_adam_gparams_s * 1e9) + (4 + w) * part / (assume.pcie_gbs * 1e9)
    step = compute * (1 + bubble) + sum(comm_s.values()) + offload
    return {"step_s": step, "compute_s": compute, "bubble_fraction": bubble, "comm_s": comm_s, "offload_s": offload,
            "model_flops_per_step": flops, "recompute_flops_per_step": recomputed,
            "active_params": matmul_params_per_token(cfg)}
