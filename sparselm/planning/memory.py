"""Per-rank memory of a layout, GPU and host, in bytes: model states by DeepSpeed's ZeRO rules, activations
from the block kinds' cost models, the optimizer step's workspace and runtime overheads.

Model states per rank (P: its parameters; d: ZeRO's partition degree, dp x cp for dense parameters and
dp x cp / ep for experts (context-parallel ranks are DeepSpeed data-parallel ranks); w: bytes of a weight, 2 under bf16/fp16, 4 in fp32; L: its largest module), as DeepSpeed's
``estimate_zero2/3_model_states_mem_needs`` (tests/unit/planning/test_plan.py checks them against those):
- ZeRO-0: weights wP, gradients wP, fp32 master 4P (when w < 4), Adam 8P, fp32 gradients 4P (when w < 4);
- ZeRO-1: weights wP, gradients wP, master + Adam + fp32 gradients 16P/d (DeepSpeed keeps the fp32
  partition and its gradient even when the weights are fp32);
- ZeRO-2: as ZeRO-1 with the w-byte gradients partitioned, wP/d; with offload_optimizer the 16P/d go to host
  and the gradients are reduced straight into it;
- ZeRO-3: weights wP/d, 16P/d, and 4L of gathered weights and gradients (L counting a layer's routed experts
  in the modules ZeRO-3 gathers them in, ``parallel.zero3_experts_per_gather``); offload_optimizer moves
  the 16P/d to host, offload_param the weights too.
Peak = runtime + model states + the larger of (activations of the micro-batches in flight + ZeRO-3's
gathered layer) and the optimizer step's workspace (one fp32 temporary of the largest parameter group's
partition: torch's AdamW, foreach=False, on DeepSpeed's flat groups).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sparselm.model.recompute import recomputed_layers
from sparselm.model.registry import block_cost
from sparselm.planning.assumptions import Assumptions, GiB
from sparselm.planning.holdings import StageHold
from sparselm.training.ds_config import working_dtype


def precision_bytes(ds: dict) -> int:
    """Bytes of one weight (and activation) under the DeepSpeed config ``ds``: 2 for bf16/fp16, else 4."""
    return working_dtype(ds).itemsize


def stage_activations(cfg, layers: list[int], tp: int, act_bytes: int, ends: float) -> dict:
    """Activation elements per token of one micro-batch on a stage holding blocks ``layers`` (the
    multi-token-prediction depths' blocks numbered after the decoder layers, of the last layer's kind) on a
    tensor-parallel rank of ``tp``, under each parallel.recompute mode (with the config's recompute_every, which
    counts on into the depths' blocks as ``parallel.recompute`` does):
    {mode: (kept from forward to backward, the largest block rebuilt at a time in backward)}.  Per block from
    its kind's cost model (``activation_elems``; ``matmul_elems`` for selective).  ``ends``: embedding and head
    elements.  Raises ConfigError for a kind without a cost model."""
    m = cfg.model
    kinds = m.layer_kinds() + m.layer_kinds()[-1:] * m.mtp_layers
    chosen = set(recomputed_layers(m.n_layers + m.mtp_layers, cfg.parallel.recompute_every))
    whole = {i: block_cost(kinds[i]).activation_elems(cfg, tp, act_bytes) for i in layers}
    kept = {i: min(whole[i], block_cost(kinds[i]).matmul_elems(cfg, tp, act_bytes)) for i in layers}
    plain = sum(v for i, v in whole.items() if i not in chosen) + ends
    mine = [i for i in layers if i in chosen]
    return {"none": (sum(whole.values()) + ends, 0.0),
            "full": (plain + cfg.model.d_model * len(mine), max((whole[i] for i in mine), default=0.0)),
            "selective": (plain + sum(kept[i] for i in mine), max((whole[i] - kept[i] for i in mine), default=0.0))}


def mtp_depth_ends(cfg, logits: float) -> float:
    """Activation elements per token one multi-token-prediction depth (``sparselm.model.mtp``) keeps beside its
    block (which ``stage_activations`` counts, recomputed or not as the decoder layers): the embedding of the
    token ahead and both input norms' outputs (the main hidden state is the final norm's input, counted
    already), their concatenation [2 x d_model] that ``eh_proj`` reads, its own final norm's input and output,
    and ``logits``: its fp32 log-probabilities (the main head's figure also holds the logits' gradient, which
    backward makes for one head at a time)."""
    return 7 * cfg.model.d_model + logits


@dataclass
class RankPlan:
    """One rank's share of a plan."""

    rank: int
    """Global rank."""
    stage: int
    """Its pipeline stage."""
    params: int
    """Parameters it holds."""
    by_kind: dict
    """``holdings.KINDS`` name -> parameters of that kind."""
    gpu: dict = field(default_factory=dict)
    """Component -> bytes on the GPU."""
    host: dict = field(default_factory=dict)
    """Component -> bytes in host memory."""
    activations: dict = field(default_factory=dict)
    """Activation bytes: per_micro_batch (no recomputation), per_micro_batch_full, per_micro_batch_selective,
    recompute (the mode planned), in_flight (micro-batches), peak and step_workspace."""
    checkpoint_bytes: int = 0
    """Bytes of its checkpoint share: fp32 weights and two Adam moments of the parameters it owns."""

    @property
    def gpu_bytes(self) -> int:
        """Total GPU bytes."""
        return int(sum(self.gpu.values()))

    @property
    def host_bytes(self) -> int:
        """Total host bytes."""
        return int(sum(self.host.values()))


def rank_memory(cfg, layout, s: StageHold, rank: int, zero_stage: int, offload_opt: bool, offload_param: bool,
                w: int, micro: int, m_batches: int, device: str, assume: Assumptions) -> RankPlan:
    """The memory of ``rank`` of ``layout`` holding stage ``s``: ZeRO stage ``zero_stage`` (offloading the
    optimizer / the parameters to host when set), ``w``-byte weights and activations, ``micro`` sequences per
    micro-batch and ``m_batches`` micro-batches per step; ``device='cpu'`` puts everything in host memory."""
    stage = layout.coord(rank).pp
    dpcp = layout.dp * layout.cp  # DeepSpeed's data axis: ZeRO partitions over the context-parallel ranks too
    edp, t, a = dpcp // layout.ep, layout.tp, w  # activations in the weights' precision
    dense, expert = s.params - s.expert, s.expert
    part = dense / dpcp + expert / edp if zero_stage >= 1 else dense + expert  # ZeRO's partition of P
    states = {"weights": w * (part if zero_stage == 3 else s.params)}
    if zero_stage <= 1:
        states["gradients"] = w * s.params
    elif zero_stage == 2 and not offload_opt:  # offloaded: reduced straight into the host's fp32 partition
        states["gradients"] = w * part
    if zero_stage == 0:
        states["fp32 master + Adam + fp32 gradients"] = (16 if w < 4 else 8) * s.params
    else:
        states["fp32 master + Adam + fp32 gradients"] = 16 * part
    if zero_stage == 3:
        states["gathered layer (ZeRO-3)"] = 4 * s.largest_gathered
    gpu, host = {}, {}
    for key, value in states.items():
        to_host = (offload_opt and key.startswith("fp32")) or (offload_param and key == "weights")
        (host if to_host else gpu)[key] = value
    # activations of one micro-batch under each recomputation mode: kept ones for every micro-batch in
    # flight, plus one recomputed block rebuilt at a time in backward; a context-parallel rank holds 1/cp of
    # the tokens (Ulysses: the attention core's whole sequence for 1/cp of the heads, the same elements)
    d, tokens = cfg.model.d_model, micro * cfg.data.seq_len / layout.cp
    logits = cfg.model.vocab_size / t * (a + 8) / a
    chunk = cfg.model.loss_chunk_tokens
    if chunk and micro * cfg.data.seq_len / layout.cp > chunk:  # the chunked loss holds one chunk's logits
        logits *= chunk / tokens
    ends = (d if s.first else 0) + ((2 * d + logits) if s.last else 0)
    blocks = list(s.layers)
    if s.last and cfg.model.mtp_layers:  # every depth runs on the last stage
        ends += cfg.model.mtp_layers * mtp_depth_ends(cfg, logits * 4 / (a + 8))
        blocks += [cfg.model.n_layers + k for k in range(cfg.model.mtp_layers)]
    if layout.cp > 1 and cfg.parallel.cp_method == "allgather":  # each layer keeps the gathered keys and values
        ends += len(s.layers) * 2 * cfg.model.kv_heads / t * cfg.model.head_width * layout.cp
    modes = {m: (tokens * a * kept, tokens * a * rebuilt)
             for m, (kept, rebuilt) in stage_activations(cfg, blocks, t, a, ends).items()}
    mode = cfg.parallel.recompute
    in_flight = min(layout.pp - stage, m_batches) if layout.pp > 1 else 1
    act = modes[mode][0] * in_flight + modes[mode][1]
    if zero_stage >= 1:
        workspace = 4 * max((n / (edp if moe else dpcp) for n, moe in s.groups.values()), default=0)
    else:
        workspace = 4 * s.largest_tensor
    if offload_opt:  # DeepSpeedCPUAdam updates in place, on the host
        workspace = 0
    (gpu if device == "gpu" else host)["activations / step workspace"] = max(act, workspace)
    if device == "gpu":
        gpu["runtime"] = assume.gpu_runtime_gb * GiB
    else:
        host.update(gpu)
        gpu = {}
    host["process"] = assume.host_process_gb * GiB
    return RankPlan(rank=rank, stage=stage, params=s.params, by_kind=s.by_kind, gpu=gpu, host=host,
                    activations={"per_micro_batch": modes["none"][0], "per_micro_batch_full": modes["full"][0],
                                 "per_micro_batch_selective": modes["selective"][0], "recompute": mode,
                                 "in_flight": in_flight, "peak": act, "step_workspace": workspace},
                    checkpoint_bytes=int(12 * (dense / dpcp + expert / edp)))
