"""What one Hugging Face decoder family is, as a record: ``Family``.

Every family sparselm converts is a pre-norm Llama-style decoder (RMSNorm, rotate-half rotary, SwiGLU); a
``Family`` names only where it differs from that base, each fact once, read by import's config mapping
(``hf_import_config``), export's blockers and config writer (``hf_export_config``) and the tensor names
(``hf_names``).  The facts follow transformers 5's ``configuration_*.py`` and ``modeling_*.py`` of the
family.  The records themselves, and their order, are in ``hf_families``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal


def slides_from_max_window_layers(layer: int, max_window_layers: int) -> bool:
    """Qwen2 / Qwen3 / dots1 without ``layer_types``: layers from ``max_window_layers`` on slide (transformers'
    ``Qwen2Config`` and ``Dots1Config`` derive ``layer_types`` so)."""
    return layer >= max_window_layers


def slides_on_even_layers(layer: int, max_window_layers: int) -> bool:
    """gpt-oss without ``layer_types``: even layers (0, 2, ...) slide, odd ones attend fully (transformers'
    ``GptOssConfig``); ``max_window_layers`` is not read."""
    return bool((layer + 1) % 2)


def slides_on_even_layers_below_max_window_layers(layer: int, max_window_layers: int) -> bool:
    """Qwen2-MoE without ``layer_types``: even layers (0, 2, ...) below ``max_window_layers`` slide
    (transformers' ``Qwen2MoeConfig``)."""
    return bool((layer + 1) % 2) and layer < max_window_layers


def interval_placement(n_layers: int, start: int, end: int, interval: int) -> list[bool]:
    """ERNIE 4.5's MoE layers (transformers' ``Ernie4_5_MoeDecoderLayer``): layer i is MoE when (i + 1) %
    ``interval`` == 0 and ``start`` <= i <= ``end`` (``end`` -1: the last layer, as ``Ernie4_5_MoeConfig``
    resolves it)."""
    end = n_layers - 1 if end == -1 else end
    return [(i + 1) % interval == 0 and start <= i <= end for i in range(n_layers)]


def interval_fields(moe_layers: list[bool]) -> tuple[int, int, int] | None:
    """(moe_layer_start_index, moe_layer_end_index, moe_layer_interval) whose ``interval_placement`` is exactly
    ``moe_layers`` (the smallest interval; at least one MoE layer), or None when no such fields exist."""
    chosen = [i for i, moe in enumerate(moe_layers) if moe]
    if not chosen:
        return None
    start, end = chosen[0], chosen[-1]
    for interval in range(1, len(moe_layers) + 1):
        if interval_placement(len(moe_layers), start, end, interval) == list(moe_layers):
            return start, end, interval
    return None


@dataclass(frozen=True)
class SharedExperts:
    """Always-on experts beside the routed ones (Qwen2-MoE's gated shared expert, GLM-4-MoE's shared experts)."""

    key: str
    """config.json key that sizes them (export writes it)."""
    module: str
    """Their module in the MoE block: ``model.layers.{i}.mlp.{module}.gate_proj.weight`` ..."""
    key_is_width: bool = False
    """The key holds their total hidden width (count x routed expert width, Qwen2-MoE), not their count."""
    gated: bool = False
    """A sigmoid gate (``mlp.shared_expert_gate``, a [1, d_model] weight) scales their output; the family has
    them in every MoE layer (exactly as many as the key says, at least one)."""
    optional: bool = False
    """The key may be 0: the family then has no shared experts (ERNIE 4.5); otherwise export refuses a model
    without them."""


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type``: how its config.json maps onto sparselm's config and its tensors are named.

    Defaults are the Llama / Mixtral base; a family sets only what differs.  Families with one layout share a
    record through ``dataclasses.replace``.
    """

    name: str
    """``model_type`` in config.json."""
    architecture: str
    """``architectures[0]`` export writes (the transformers class, e.g. ``LlamaForCausalLM``)."""
    moe: bool = False
    """Its decoder layers are MoE blocks (routed experts); otherwise every layer is a dense SwiGLU."""
    config_defaults: tuple[tuple[str, object], ...] = ()
    """config.json entries as its transformers config class fills them when left out, where that differs from
    import's Llama-style fallbacks (dots1's ``sliding_window`` 4096 and ``max_window_layers`` 62, MiniMax-M2's
    ``head_dim`` 128, ERNIE 4.5's tied embeddings, rope_theta 500000, rms_norm_eps 1e-5, two shared experts ...);
    import reads a config.json through them (``hf_import_config.with_defaults``)."""

    # ---------------------------------------------------------------- attention
    qkv_bias_key: str | None = None
    """config.json key that switches q/k/v projection biases (and only those); None: the family has them always
    or never (``qkv_bias``).  A family with neither this key nor ``o_bias_key`` ignores ``attention_bias``, as
    transformers builds it (Mistral, Mixtral, Qwen2, MiniMax-M2)."""
    qkv_bias: bool = False
    """q/k/v biases when ``qkv_bias_key`` is None (always there: Qwen2), else the key's default when absent."""
    qk_norm: Literal["none", "per_head", "full"] = "none"
    """RMSNorm of queries and keys: per head (Qwen3, ``head_dim`` wide) or over all heads (OLMoE)."""
    qk_norm_key: str | None = None
    """config.json boolean that switches ``qk_norm`` on (GLM-4-MoE's ``use_qk_norm``); None: always ``qk_norm``."""
    clip_qkv: bool = False
    """Reads and writes ``clip_qkv`` (OLMoE: q, k, v clamped to [-clip_qkv, clip_qkv]; null is off)."""
    o_bias_key: str | None = None
    """config.json key that also puts a bias on o_proj (gpt-oss's and dots1's ``attention_bias``, the same key as
    ``qkv_bias_key``: q, k, v and o biased together)."""
    attention_sinks: bool = False
    """Every attention layer has learned sinks, one logit per query head (``self_attn.sinks``; gpt-oss)."""
    partial_rotary: bool = False
    """Rotary may cover a fraction of each head (``partial_rotary_factor`` < 1, GLM-4-MoE); any family reads it,
    only these express it on export."""
    legacy_rotary_dim: bool = False
    """config.json may give the rotated channels per head as the legacy ``rotary_dim`` (MiniMax-M2's releases):
    read as ``rotary_dim / head_dim`` where no ``partial_rotary_factor`` is given (transformers'
    ``MiniMaxM2Config.convert_rope_params_to_dict``), written beside ``rope_parameters.partial_rotary_factor``."""
    interleaved_rope: bool = False
    """Standard attention whose rotary pairs are interleaved channels (0, 1), (2, 3) ... over the whole head
    (ERNIE 4.5's ``apply_rotary_pos_emb``): sparselm's ``model.rope_interleave``, the q/k rows kept as stored.
    transformers rotates them in fp32, sparselm in the model's dtype (the same in fp32; in bf16 the rotated
    q/k round differently).  Its default rope ignores ``partial_rotary_factor`` (head_dim-wide frequencies); a
    scaled rope with a factor < 1 is refused (transformers' tables would not match the heads)."""
    bias_key: str | None = None
    """config.json boolean that biases every projection (q, k, v, o, the MLPs, the shared experts and lm_head:
    ERNIE 4.5's ``use_bias``); sparselm has no MLP or output-head biases, so import refuses it true and export
    writes it false."""

    mla: bool = False
    """Its attention is multi-head latent attention (DeepSeek-V2/V3: ``q_lora_rank`` (null: one q_proj),
    ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``, ``rope_interleave``; latent
    norms at eps 1e-6; tensors ``self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj``), sparselm's ``model.attention=mla``."""
    rope_interleave_key: str | None = "rope_interleave"
    """An MLA family's config.json boolean for interleaved rope pairs (absent: true); None: always interleaved
    (DeepSeek-V2's complex-pair rope)."""
    mtp_key: str | None = None
    """config.json key counting the multi-token-prediction layers the checkpoint stores after the decoder
    layers, as ``model.layers.{n_layers + k}`` (DeepSeek-V3's ``num_nextn_predict_layers``: ``enorm``,
    ``hnorm``, ``eh_proj``, ``shared_head.norm``, a decoder layer, and copies of the embedding and head);
    None: the family has no place for them (export refuses model.mtp_layers)."""

    # ---------------------------------------------------------------- sliding windows
    window: Literal["none", "all", "per_layer"] = "none"
    """Which layers slide within ``sliding_window`` tokens: none (the key is ignored), all or none of them
    (Mistral), or each by ``layer_types`` (Qwen2)."""
    window_switch: bool = False
    """transformers drops ``sliding_window`` unless ``use_sliding_window`` is true (published Qwen configs keep a
    window they do not use); export writes the switch."""
    legacy_window_layers: Callable[[int, int], bool] | None = None
    """``window="per_layer"`` and a config.json older than ``layer_types``: (layer, max_window_layers) -> the
    layer slides, as transformers derives it."""

    # ---------------------------------------------------------------- MoE block
    experts_key: str = "num_experts"
    """config.json key of the routed expert count export writes (import reads it, else ``num_local_experts``,
    ``num_experts`` or ``n_routed_experts``, the first set)."""
    top_k_key: str = "num_experts_per_tok"
    """config.json key of the experts chosen per token (ERNIE 4.5: ``moe_k``)."""
    expert_hidden_key: str = "moe_intermediate_size"
    """config.json key of one routed expert's hidden width export writes."""
    expert_hidden_reads: tuple[str, ...] = ("moe_intermediate_size", "intermediate_size")
    """Keys import reads that width from: the first set one; the last is required."""
    renormalize_key: str | None = "norm_topk_prob"
    """config.json boolean: the top-k weights are renormalised to sum to 1 (absent: false); None: always
    renormalised (Mixtral)."""
    renormalize_min_key: str | None = None
    """config.json key of the floor the top-k weights' sum is clamped to before renormalising (ERNIE 4.5's
    ``moe_norm_min``, 1e-12).  sparselm clamps at the smallest normal fp32 number instead: the two differ only
    when the chosen experts' softmax mass is below the floor, so import refuses floors above 1e-12 and export
    writes 1e-12."""
    never_renormalize: bool = False
    """The top-k weights are never renormalised, whatever ``renormalize_key`` says (DeepSeek-V2 ignores
    norm_topk_prob)."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over experts, or per-expert sigmoid (GLM-4-MoE)."""
    router_module: str = "gate"
    """The router's module in the MoE block (``mlp.gate.weight``; gpt-oss: ``mlp.router.weight``)."""
    router_bias: bool = False
    """The router has a learned bias on its logits (``{router_module}.bias``; gpt-oss), moving choice and weights."""
    expert_layout: Literal["rows", "gpt_oss"] = "rows"
    """How routed experts are stored: 'rows', per-expert ``nn.Linear`` weights or transformers 5's fused
    ``gate_up_proj`` [E, 2I, D] (gate rows then up rows) / ``down_proj`` [E, D, I]; 'gpt_oss', fused only,
    input-major ``gate_up_proj`` [E, D, 2I] with gate and up interleaved, ``down_proj`` [E, I, D], both with
    biases, optionally as MXFP4 ``*_blocks`` / ``*_scales`` (``gpt_oss_experts``)."""
    clamped_swiglu: bool = False
    """Experts use the clamped SwiGLU with ``swiglu_limit`` and ``swiglu_alpha`` and an up offset of 1 (gpt-oss)."""
    mxfp4: bool = False
    """Checkpoints may hold routed experts as MXFP4 (``quantization_config.quant_method: mxfp4``); import
    dequantizes them tensor by tensor."""
    selection_bias: bool = False
    """The router adds a learned per-expert bias (``gate.e_score_correction_bias``) when choosing, not weighting,
    experts (sparselm's ``moe.bias_balancing``)."""
    selection_bias_name: str = "gate.e_score_correction_bias"
    """That bias's name in the MoE block (``model.layers.{i}.{moe_module}.{name}``): on the router (DeepSeek-V3,
    GLM-4-MoE, dots1) or on the block itself (MiniMax-M2: ``e_score_correction_bias``)."""
    statics_bias: bool = False
    """The selection bias is ERNIE 4.5's ``moe_statics.e_score_correction_bias``, shaped [1, E]: stored as
    ``mlp.moe_statics.e_score_correction_bias`` (transformers 5 in memory: ``mlp.gate.moe_statics...``),
    reshaped to and from sparselm's [E] ``router.expert_bias``."""
    group_routing: bool = False
    """Group-limited routing (``n_group`` / ``topk_group``) and a ``routed_scaling_factor`` on the weights."""
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    """How a group is scored (sparselm's ``moe.group_score``): its two best experts summed (DeepSeek-V3,
    GLM-4-MoE) or its best one (DeepSeek-V2, only with ``topk_method: group_limited_greedy``; ``greedy`` is no
    group limit)."""
    shared_experts: SharedExperts | None = None
    """Always-on experts, if the family has them (see ``SharedExperts``)."""
    dense_layers: Literal["none", "listed", "first", "types", "interval"] = "none"
    """Which layers keep a dense SwiGLU: none, those in ``mlp_only_layers`` or off ``decoder_sparse_step``
    (Qwen-MoE), the first ``first_k_dense_replace`` (GLM-4-MoE), those ``mlp_layer_types`` says 'dense'
    (GLM-4.x-Lite; absent: the first layer only), or 'interval': all but layers i with (i + 1) %
    ``moe_layer_interval`` == 0 and ``moe_layer_start_index`` <= i <= ``moe_layer_end_index`` (-1: the last
    layer; ERNIE 4.5, ``interval_placement``)."""
    moe_module: str = "mlp"
    """The MoE block's module in the per-expert layout published checkpoints hold (Mixtral:
    ``block_sparse_moe``); transformers 5's fused layout always says ``mlp``."""
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """(gate, up, down) weight names of one expert: ``{moe_module}.experts.{e}.{name}.weight`` (Mixtral: w1, w3, w2)."""
    mtp_tensors: str | None = None
    """Regular expression (``re.search``) of the tensor names of multi-token-prediction layers stored under
    their own names (ERNIE 4.5: ``model.mtp_block.{k}.*``, ``mtp_emb_norm``, ``mtp_hidden_norm``,
    ``mtp_linear_proj``), which sparselm does not carry: import refuses a checkpoint holding them unless
    ``--drop-mtp``, and then says in one line that it left them out."""
    fixed_config: tuple[tuple[str, object], ...] = ()
    """Constant config.json entries export writes for an MoE family (Mixtral's ``router_jitter_noise=0``, GLM's
    ``num_nextn_predict_layers=0``: no multi-token-prediction layers)."""

    def qk_norms(self) -> tuple[str, ...]:
        """The ``model.qk_norm`` values the family expresses."""
        return ("none", self.qk_norm) if self.qk_norm_key else (self.qk_norm,)

    def allows_qkv_bias(self) -> bool:
        """The family can have q/k/v biases (always, or through ``qkv_bias_key``)."""
        return self.qkv_bias or self.qkv_bias_key is not None
