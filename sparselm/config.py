"""One typed configuration tree for sparselm, declared statically (``Config``).

Every field has a docstring (the string literal under it); ``describe()`` prints them.  Choices are
``Literal[...]`` types, checked when a value is set.  The layer sections (``moe``, ``pkm``,
``attention``) are declared beside their layers and listed here.  Configs come from a YAML preset
(found by name in ``sparselm/configs/`` or by path), then dotted overrides ``--section.key=value``;
``validate()`` runs before any work, checks each rule once and names the bad field and the fix.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from sparselm.data.blend import parse_blend
from sparselm.errors import ConfigError, require
from sparselm.model.moe.config import MoEConfig, validate_moe
from sparselm.model.pkm.config import PKMConfig, validate_pkm
from sparselm.model.registry import BLOCKS
from sparselm.model.sparse_attention.config import AttentionConfig, validate_attention
from sparselm.parallel.layout import check_layout_fits_model

__all__ = ["Config", "ConfigError", "require", "load_config", "config_from_dict", "to_dict", "to_yaml", "describe",
           "validate", "parse_overrides", "field_docs"]

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class RopeConfig:
    """Rotary position embedding (Su et al. 2021, RoFormer) and its long-context scalings, with frequencies as
    transformers 5 computes them (``modeling_rope_utils``)."""

    theta: float = 10000.0
    """Base of the rotary position frequencies."""
    scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    """Rotary frequency scaling for long contexts, computed as transformers computes it: 'linear' (positions /
    factor), 'llama3' (Llama 3.1+: low frequencies / factor, smooth between), 'yarn' (YaRN, with its
    attention factor)."""
    factor: float = 1.0
    """Context extension factor of model.rope.scaling (transformers' rope_parameters.factor)."""
    original_max_seq_len: int = 0
    """Context length the model was pretrained at (original_max_position_embeddings); llama3 and yarn need it."""
    low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original / high_freq_factor are kept; between, smoothly interpolated."""
    beta_fast: float = 32.0
    """yarn: rotations bounding the extrapolated (unscaled) frequencies."""
    beta_slow: float = 1.0
    """yarn: rotations bounding the interpolated (scaled) frequencies."""
    attention_factor: float = 0.0
    """yarn: factor on cos and sin (scales the attention logits by its square); 0 means 0.1 * ln(factor) + 1."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions (transformers' truncate)."""
    mscale_all_dim: float = 0.0
    """Multi-head latent attention (model.attention=mla) with a rope scaling: when > 0, the softmax scale is
    multiplied by (0.1 * mscale_all_dim * ln(factor) + 1)^2 (factor > 1), as DeepSeek-V2/V3 and transformers'
    yarn_apply_mscale do; 0: unchanged."""


@dataclass
class ModelConfig:
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (query heads)."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means equal to n_heads."""
    d_ff: int = 0
    """Hidden width of the dense SwiGLU feed-forward; 0 means 8/3 * d_model rounded up to a multiple of 64."""
    vocab_size: int = 0
    """Embedding rows; 0 means the tokenizer's vocabulary padded to a multiple of pad_vocab_to."""
    pad_vocab_to: int = 64
    """Pad the vocabulary to a multiple of this (fast matmuls, divisible by the tensor-parallel degree)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (rotary positions are computed per call, so it sizes no table)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal init; output projections are scaled by 1/sqrt(2 * n_layers)."""
    pattern: list[str] = field(default_factory=lambda: ["dense"])
    """Block kinds, repeated cyclically to n_layers (e.g. [dense, moe]); see sparselm.model.registry."""
    head_dim: int = 0
    """Width of one attention head; 0 means d_model // n_heads.  Queries are n_heads * head_dim wide and keys and
    values n_kv_heads * head_dim, whatever d_model is (Qwen3: head_dim 128)."""
    qkv_bias: bool = False
    """Biases in the query, key and value projections (Qwen2, Qwen2-MoE, GLM-4-MoE, gpt-oss); see o_bias for the output
    projection's.  Under model.attention=mla: in the latent down-projections (q_a_proj with a query latent, and
    kv_a_proj), where DeepSeek's attention_bias puts them."""
    o_bias: bool = False
    """A bias in the attention output projection (gpt-oss; transformers' attention_bias biases q, k, v and o)."""
    attention_sinks: bool = False
    """A learned logit per query head that joins every attention softmax and carries no value, so a head may attend
    to nothing (gpt-oss's sinks); exact on every attention path, window, sparse pattern and persistent memory."""
    qk_norm: Literal["none", "per_head", "full"] = "none"
    """RMSNorm of queries and keys before rotary: 'per_head' over each head's head_dim with one weight shared by
    the heads (Qwen3, Qwen3-MoE, GLM-4-MoE), 'full' over all heads together, one weight per channel (OLMoE)."""
    clip_qkv: float = 0.0
    """Clamp queries, keys and values to [-clip_qkv, clip_qkv] after the projections (and qk_norm); 0 disables it
    (OLMoE's clip_qkv)."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary positions: base frequency and long-context scaling (model.rope.theta, model.rope.scaling, ...)."""
    rotary_fraction: float = 1.0
    """Fraction of each head's width rotated by rotary positions (the first channels); the rest passes unrotated
    (transformers' partial_rotary_factor; GLM-4-MoE: 0.5)."""
    sliding_window: int = 0
    """Keys a query sees in layers of kind 'sliding' in attention_layers (itself and the window - 1 before it)."""
    attention_layers: list[str] = field(default_factory=lambda: ["full"])
    """Attention of each layer, repeated cyclically to n_layers as pattern is: 'full' (causal) or 'sliding'
    (causal within model.sliding_window; Mistral, Qwen2's max_window_layers)."""
    loss_chunk_tokens: int = 8192
    """Tokens whose logits the training loss computes at once: longer batches are cut into chunks of this many
    tokens, each chunk's fp32 logits recomputed in backward instead of kept (the whole batch's fp32 logits,
    tokens x vocabulary x 4 bytes, are never held; one more output-projection forward of time).  0: the whole
    batch at once.  The loss and gradients are the same up to fp32 summation order."""

    attention: Literal["mha", "mla"] = "mha"
    """Attention of every block: 'mha' multi-head attention with optional grouped-query heads (n_kv_heads,
    head_dim, qk_norm, qkv_bias, clip_qkv apply); 'mla' multi-head latent attention (DeepSeek-V2/V3): queries
    optionally through a q_lora_rank latent, keys and values up-projected per head from one kv_lora_rank
    latent, a decoupled rotary key of qk_rope_head_dim shared by all heads (model.q_lora_rank,
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, latent_norm_eps); sliding layers and the
    sparse patterns of attention.pattern apply to its scores, persistent memory does not."""
    q_lora_rank: int = 0
    """model.attention=mla: width of the query latent (a down-projection, its RMSNorm, an up-projection);
    0: one query projection from d_model (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 0
    """model.attention=mla: width of the key/value latent every head's keys (their unrotated part) and values
    are up-projected from; required (> 0) with mla."""
    qk_nope_head_dim: int = 0
    """model.attention=mla: channels of each head's query and key without rotary positions (may be 0)."""
    qk_rope_head_dim: int = 0
    """model.attention=mla: rotary channels of each head's query; the rotary key of this width is one, shared
    by all heads (even, > 0 with mla).  A query/key head is qk_nope_head_dim + qk_rope_head_dim wide."""
    v_head_dim: int = 0
    """model.attention=mla: width of each head's value (and of the output projection's input per head)."""
    latent_norm_eps: float = 1e-6
    """model.attention=mla: epsilon of the query and key/value latents' RMSNorms (DeepSeek fixes it at 1e-6,
    whatever norm_eps is)."""
    rope_interleave: bool = False
    """Rotary pairs are interleaved channels (x0, x1), (x2, x3), ... (DeepSeek's rope_interleave, GPT-J
    style; ERNIE 4.5's rope on standard attention) instead of the two halves of the rotated channels (Llama's
    rotate_half)."""

    mtp_layers: int = 0
    """Multi-token prediction depths (DeepSeek-V3): depth k predicts the token k + 1 ahead with one more block
    of the last layer's kind, the shared embedding and output head; its loss is added to the training loss
    (model.mtp_loss_weight) and logged as mtpK_loss.  Generation and evaluation use the main head only;
    0: off."""
    mtp_loss_weight: float = 0.3
    """Weight of the multi-token-prediction loss: loss = lm_loss + aux + weight x mean over depths of their
    token losses (DeepSeek-V3's lambda: 0.3, later 0.1)."""
    hf_family: str = ""
    """The Hugging Face ``model_type`` the model was imported from (``import-hf`` sets it; it changes no
    computation): ``export-hf`` writes that family again when it expresses the model, so a model two families
    can express (an imported GLM-4-MoE that dots1 could also write) goes back as it came; '' or a family that
    no longer expresses it (after ``upcycle``): the first family that does."""

    def layer_kinds(self) -> list[str]:
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]

    def layer_window(self, layer_idx: int) -> int:
        """Keys a query of layer ``layer_idx`` sees at most (itself included); 0: all before it."""
        kind = self.attention_layers[layer_idx % len(self.attention_layers)]
        return self.sliding_window if kind == "sliding" else 0

    @property
    def head_width(self) -> int:
        """The resolved head_dim."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (megatron-core tensor_parallel layers)."""
    pp: int = 1
    """Pipeline-parallel stages (DeepSpeed pipeline engine)."""
    ep: int = 1
    """Expert-parallel degree (DeepSpeed expert groups); must divide the data-parallel size times parallel.cp
    (experts fold over data and context-parallel ranks alike)."""
    cp: int = 1
    """Context-parallel degree: each sequence is cut into cp contiguous pieces after its labels are shifted, one
    per rank of a context-parallel group (those ranks read the same samples and hold the same parameters), and
    attention exchanges them as parallel.cp_method says.  Losses, gradients and metrics equal cp=1's; every
    rank holds 1/cp of the activations.  The world is tp * pp * cp * dp ranks; data.seq_len must be a multiple
    of cp (of 2 cp with cp_method=allgather)."""
    cp_method: Literal["ulysses", "allgather"] = "ulysses"
    """Context-parallel attention: 'ulysses' (DeepSpeed-Ulysses): an all-to-all turns this rank's tokens of every
    head into every token of 1/cp of the heads, the attention core (any pattern, backend, window and persistent
    memory) runs unchanged on the whole sequence, and a second all-to-all turns it back.  Needs the query heads
    per TP rank (model.n_heads / tp) divisible by cp, and the key/value heads per TP rank divisible by cp or
    dividing it (they are then replicated).  'allgather' (Megatron's all_gather): each rank keeps its queries
    (chunks r and 2cp-1-r of 2cp: causal work balanced) and gathers the whole sequence's keys and values; the
    pattern's mask and rotary at global positions; no head limit, data.seq_len a multiple of 2 cp; masked
    SDPA core (O(T/cp x T) scores per rank)."""
    zero_stage: int = -1
    """ZeRO stage 0-3; -1 keeps the stage of the DeepSpeed JSON named by ds_config."""
    ds_config: str = "zero1"
    """DeepSpeed JSON: a name in ds_configs/ (zero1, zero2_offload, zero3_offload, bf16, fp16) or a path."""
    pp_partition: str = "parameters"
    """How layers are split into pipeline stages: 'parameters' (balance parameter counts), 'uniform' (layer
    counts) or 'type:REGEX' (balance layers whose class matches, e.g. 'type:BlockStage')."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation in every layout (pipelines included): 'full' keeps only each recomputed
    block's input and runs its forward again in backward (least memory, about one more forward of time);
    'selective' keeps the blocks' weight-matmul outputs and recomputes attention core, norms, activations
    and MoE dispatch (less memory saved, little time); 'none' keeps every activation."""
    recompute_every: int = 1
    """With parallel.recompute: recompute every N-th block (blocks N-1, 2N-1, ..., the multi-token-prediction
    depths' blocks counted after the model.n_layers decoder blocks); 1: all blocks.  At most model.n_layers."""
    timeout_minutes: float = 30.0
    """Minutes a collective (or the start-up rendezvous) may wait for the other ranks before it fails
    with an error instead of hanging, in every process group the run creates (torch.distributed's
    process-group timeout); a peer lost or hung for longer stops the run with exit status 69."""
    tp_across_nodes: bool = False
    """Allow a tensor-parallel group whose ranks sit on different hosts (refused at start-up otherwise: its
    per-layer all-reduces would cross the network; usually uneven hostfile slots or a cyclic distribution)."""
    zero3_experts_per_gather: int = 1
    """Under ZeRO stage 3: routed experts per module ZeRO-3 gathers at once (each MoE layer's local experts
    are held as modules of this many, like DeepSpeed's one module per expert), so a step holds one such group
    of one layer's experts in device memory, not the whole layer's; 0 (or at least the local experts) gathers
    all of a layer's local experts together (fewer, larger gathers and one grouped GEMM).  Under stage 3 it
    must divide moe.num_experts / parallel.ep when smaller; ignored below stage 3.  The numbers are the same
    either way."""
    moe_tp_mode: Literal["weights", "rows"] = "weights"
    """With tp > 1, how routed experts use the tensor-parallel group (same numbers either way).
    'weights': each TP rank holds 1/tp of every local expert's hidden width (gate/up rows, down columns)
    and the outputs are all-reduced over tp (expert tensor parallelism, as Megatron's): expert memory and
    compute / tp.  'rows': experts stay whole on every TP rank and each computes 1/tp of the routed rows
    (outputs and expert gradients all-reduced over tp): compute / tp, expert memory not divided."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay; never applied to norms, biases or embeddings."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class DataConfig:
    dataset: str | list = "default"
    """'default' (the Python standard library source, embedded), an indexed dataset prefix (PATH without
    .bin/.idx), or a weighted mixture: Megatron's string 'W1 PREFIX1 W2 PREFIX2 ...' or a YAML list of
    {prefix, weight, name} (see sparselm.data.blend)."""
    valid_dataset: str | list = ""
    """Validation data: a prefix or a mixture (each source is evaluated on its own, val_loss/<name>); empty
    means the held-out documents of each `dataset` source."""
    valid_fraction: float = 0.02
    """Fraction of documents held out for validation when valid_dataset is empty (split by document hash)."""
    tokenizer: str = "byte"
    """'byte' (no file needed) or the path of any tokenizers-library tokenizer.json (made by
    `tools/train_tokenizer.py`, or saved by transformers for an existing model)."""
    eod_token: str = ""
    """Text of the end-of-document token when the tokenizer's own special tokens do not tell it (e.g.
    '<|im_end|>'); empty: <|endoftext|>, </s>, <|end_of_text|>, <eos>, or the eos_token of a
    tokenizer_config.json beside the tokenizer file."""
    seq_len: int = 128
    """Tokens per training sample; documents are packed with an end-of-document token."""
    allow_repeat: bool = False
    """Start a new shuffled epoch when the data runs out instead of stopping with an error."""
    cache_dir: str = ""
    """Where the default corpus is tokenized once; empty means ~/.cache/sparselm."""
    prefetch: int = 2
    """Training batches read ahead on a background thread while the current step runs (the same batches as
    reading them in turn); 0 reads each on the training thread."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all data-parallel ranks; fixed whatever the layout."""
    micro_batch_size: int = 0
    """Sequences per forward pass on one rank; 0 means the whole per-rank batch (no accumulation)."""
    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, tensorboard/ (saved absolute in config.yaml)."""
    seed: int = 1234
    """Seed of model init, data order and sampling."""
    log_every: int = 1
    """Write metrics every N steps."""
    eval_every: int = 50
    """Validate every N steps (and at the end); 0 disables."""
    eval_batches: int = 4
    """Global batches per validation."""
    save_every: int = 0
    """Checkpoint every N steps; 0 means only at the end."""
    save_every_minutes: float = 0.0
    """Also checkpoint whenever this many minutes of wall-clock time passed since the last checkpoint
    (after the step in progress); 0 disables.  Bounds the work a crash or a hard kill can lose."""
    stop_file: str = ""
    """A path: once it exists the run saves a checkpoint and stops with exit status 75, as on SIGUSR1
    (rank 0 looks once per step).  The sbatch scripts set it and create the file when SLURM warns of the
    time limit.  Empty: not used."""
    max_minutes: float = 0.0
    """Save a checkpoint and stop (exit status 75, see sparselm.training.preemption) once the run has lasted this
    many minutes, counted from start-up; set it below a job's time limit.  0: no limit."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are removed after a newer one is complete. 0 keeps all."""
    async_save: bool = False
    """Write checkpoints on a background thread while training continues (each rank first copies its pieces to
    host memory); ``latest`` moves when the write is complete, and the next save waits for the previous one."""
    resume: str = ""
    """'latest' (newest checkpoint in out_dir, if any) or a checkpoint directory; empty starts fresh."""
    resume_fallback: bool = False
    """With resume='latest': when the latest checkpoint fails verification (a file changed since it was written,
    truncated or missing), resume from the newest earlier checkpoint that verifies and say so, instead of
    refusing to start (the default).  Nothing is deleted either way."""
    max_skipped_steps: int = 3
    """Stop the run (exit status 65, no checkpoint written) after this many consecutive steps whose loss, an
    aux loss or the gradient norm was not finite; such steps are never applied and are logged with
    `skipped`.  fp16's loss-scale overflows (finite losses) are skipped without counting.  0: never stop."""
    skip_batches: int = 0
    """Global batches to skip over the whole run, for resuming past the batches that made a run diverge: a
    resume skips those its checkpoint has not skipped yet (the data order stays deterministic), so a requeue
    with the same command does not skip twice.  The divergence message gives the value."""
    progress: bool = True
    """Show a progress bar on rank 0 when stdout is a terminal (logs get one plain line per logged step)."""
    tensorboard: bool = True
    """Write TensorBoard events under out_dir/tensorboard."""
    compile: bool = False
    """torch.compile each transformer block (torchtitan's per-block compile, inductor) before the engine is
    built; MoE blocks break the graph where a shape depends on the routing.  Off by default everywhere: on
    CPU the compile time outweighs the gain, and on CUDA it is not yet measured faster (tools/gpu_check.py
    measures both).  Refused with ZeRO stage 3, whose per-module gather hooks would run inside compiled blocks."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, the denominator of the logged `mfu`; 0 looks the CUDA device up by name in
    sparselm.planning.flops.PEAK_TFLOPS at the run's precision (no mfu on CPU or for an unknown device)."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline writes
    out_dir/wandb without a network); empty disables it."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout and DeepSpeed settings."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts layers (block kind `moe`): router, experts, capacity, balancing losses."""
    pkm: PKMConfig = field(default_factory=PKMConfig)
    """Product-key memory layers (block kinds `pkm`, `pkm_ffn`): keys, lookup, values, usage metrics."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention in every block: sparse pattern, persistent memory slots (all-attention), backend."""


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under each field of a dataclass."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)
    return docs


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if origin is types.UnionType:  # `str | list`: a list stays a list, anything else is a string
        return list(value) if isinstance(value, (list, tuple)) else _coerce(value, str, where)
    if origin is Literal:
        choices = get_args(typ)
        if value not in choices:
            raise ConfigError(f"{where.strip(chr(39))}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (inner,) = get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            num = float(value) if typ is float else int(str(value), 0) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(num, float):
            if not num.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            num = int(num)
        return typ(num)
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


REMOVED = {"parallel.activation_checkpoint_interval": " (replaced by parallel.recompute=full with "
           "parallel.recompute_every=N, in every layout)"}
"""Keys that were removed, with what says the same now (refused with that hint)."""

RENAMED = {f"model.rope_{name}": f"model.rope.{name}" for name in (
    "theta", "scaling", "factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor", "beta_fast",
    "beta_slow", "attention_factor", "truncate")}
"""Keys that moved, old -> new: an old key still sets the new one, so older configs and checkpoints load."""


def _apply(obj, data: dict, where: str) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if path in RENAMED:
            section, _, leaf = RENAMED[path].removeprefix(f"{where}.").rpartition(".")
            _apply(getattr(obj, section), {leaf: value}, f"{where}.{section}")
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(f'{where}.{c}' if where else c for c in close)}?)" if close else ""
            hint = REMOVED.get(path, hint)
            raise ConfigError(f"unknown config key '{path}'{hint}; run `python -m sparselm.train --help-config` for all keys")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; set its keys as {path}.KEY")
            _apply(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], f"'{path}'"))


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file '{name_or_path}' does not exist; give a preset name ({', '.join(list_presets())}) or an existing YAML path")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"no preset named '{name_or_path}'; presets: {', '.join(list_presets())}; or give a YAML path")
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_overrides(args: list[str]) -> dict:
    """['--train.steps=20', '--model.pattern', 'dense,moe'] -> nested dict."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '--{key}' has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        i += 1
        if "." not in key:
            raise ConfigError(f"override '--{key}' must name a section and a key, e.g. --train.{key}=...")
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value) if value not in ("",) else ""
    return nested


def load_config(name_or_path: str | None = None, overrides: list[str] | dict | None = None, check: bool = True):
    """Build a Config from a preset/YAML and overrides, validated unless ``check`` is false (the trainer's
    preflight validates it after the world-size check)."""
    cfg = Config()
    if name_or_path:
        path = resolve_preset(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
        _apply(cfg, data, "")
    if overrides:
        _apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides, "")
    if check:
        validate(cfg)
    return cfg


def config_from_dict(data: dict):
    """Rebuild a config saved by to_dict (checkpoints); unknown sections are an error."""
    cfg = Config()
    _apply(cfg, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cfg=None) -> str:
    """Every key with its default and docstring, for --help-config."""
    cfg = cfg or Config()
    lines = []
    for sec in fields(cfg):
        lines.append(f"[{sec.name}]")
        lines.extend(_describe_section(getattr(cfg, sec.name), sec.name))
    return "\n".join(lines)


def _describe_section(section, where: str) -> list[str]:
    docs, lines = field_docs(type(section)), []
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            lines.extend(_describe_section(value, f"{where}.{f.name}"))
        else:
            lines.append(f"  {where}.{f.name} = {value!r}\n      {docs.get(f.name, '')}")
    return lines


def validate_attention_features(m) -> None:
    """The model section's attention options (head width, q/k norm, rotary scaling, sliding windows)."""
    rot = m.head_width * m.rotary_fraction
    require(m.attention == "mla" or (0 < m.rotary_fraction <= 1 and rot == int(rot) and int(rot) % 2 == 0),
            f"model.rotary_fraction={m.rotary_fraction} must be in (0, 1] and rotate an even number of the "
            f"{m.head_width} channels of a head")
    require(m.clip_qkv >= 0, f"model.clip_qkv must be >= 0 (0 disables it), got {m.clip_qkv}")
    if m.rope.scaling != "none":
        require(m.rope.factor > 0, f"model.rope.factor={m.rope.factor} must be > 0 with model.rope.scaling={m.rope.scaling}")
    if m.rope.scaling in ("llama3", "yarn"):
        require(m.rope.original_max_seq_len > 0, f"model.rope.scaling={m.rope.scaling} needs "
                "model.rope.original_max_seq_len (the pretraining context length)")
    if m.rope.scaling == "llama3":
        require(m.rope.high_freq_factor > m.rope.low_freq_factor > 0, "model.rope.high_freq_factor must exceed "
                f"model.rope.low_freq_factor > 0, got {m.rope.high_freq_factor} and {m.rope.low_freq_factor}")
    if m.attention == "mla":
        validate_latent_attention(m)
    require(len(m.attention_layers) > 0, "model.attention_layers is empty; give at least one of full, sliding")
    for kind in m.attention_layers:
        require(kind in ("full", "sliding"), f"model.attention_layers names '{kind}'; known: full, sliding")
    if "sliding" in m.attention_layers:
        require(m.sliding_window > 0, "model.attention_layers has 'sliding' layers; set model.sliding_window > 0")


def block_cost_memory(cfg, kind: str) -> int:
    """Persistent memory slots of block kind ``kind``'s attention (its cost model's ``memory_slots``)."""
    return BLOCKS[kind].cost.memory_slots(cfg)


def validate_latent_attention(m) -> None:
    """model.attention=mla's widths, and the multi-head attention options it has no place for."""
    require(m.kv_lora_rank > 0 and m.v_head_dim > 0 and m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0,
            f"model.attention=mla needs model.kv_lora_rank > 0, model.v_head_dim > 0 and an even "
            f"model.qk_rope_head_dim > 0 (got {m.kv_lora_rank}, {m.v_head_dim}, {m.qk_rope_head_dim})")
    require(m.q_lora_rank >= 0 and m.qk_nope_head_dim >= 0 and m.latent_norm_eps > 0,
            "model.q_lora_rank and model.qk_nope_head_dim must be >= 0 and model.latent_norm_eps > 0 with "
            "model.attention=mla")
    require(m.n_kv_heads in (0, m.n_heads), f"model.n_kv_heads={m.n_kv_heads} with model.attention=mla: every head "
            "has its own key and value there; leave model.n_kv_heads at 0 (or n_heads)")
    for name, off in (("qk_norm", "none"), ("clip_qkv", 0.0), ("rotary_fraction", 1.0)):
        require(getattr(m, name) == off, f"model.{name}={getattr(m, name)!r} does not apply to model.attention=mla "
                f"(its rotary part is model.qk_rope_head_dim); set model.{name}={off!r} or model.attention=mha")


def validate(cfg) -> None:
    m, p, t, d, o = cfg.model, cfg.parallel, cfg.train, cfg.data, cfg.optim
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "pad_vocab_to"):
        require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    require(m.head_dim > 0 or m.d_model % m.n_heads == 0 or m.attention == "mla", f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; pick heads that divide the width or set model.head_dim")
    require(m.head_dim >= 0, f"model.head_dim must be >= 0 (0: d_model / n_heads), got {m.head_dim}")
    require(m.loss_chunk_tokens >= 0, f"model.loss_chunk_tokens must be >= 0 (0: the whole batch at once), got {m.loss_chunk_tokens}")
    require(m.head_width % 2 == 0 or m.attention == "mla", f"the head width {m.head_width} (model.head_dim or d_model/n_heads) must be even for rotary positions")
    validate_attention_features(m)
    require(m.n_heads % m.kv_heads == 0, f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.kv_heads}")
    require(len(m.pattern) > 0, "model.pattern is empty; give at least one block kind, e.g. [dense]")
    require(m.mtp_layers >= 0 and m.mtp_loss_weight >= 0, "model.mtp_layers and model.mtp_loss_weight must be "
            f">= 0 (0 layers: no multi-token prediction), got {m.mtp_layers} and {m.mtp_loss_weight}")
    require(m.mtp_layers < d.seq_len, f"model.mtp_layers={m.mtp_layers} leaves no position to predict in "
            f"data.seq_len={d.seq_len} tokens; use fewer depths")
    require(m.attention == "mha" or not cfg.attention.persistent_slots,
            f"model.attention=mla with attention.persistent_slots={cfg.attention.persistent_slots}: persistent "
            "memory is built for model.attention=mha only; set attention.persistent_slots=0")
    require(m.attention == "mha" or all(block_cost_memory(cfg, k) == 0 for k in set(m.layer_kinds()) if k in BLOCKS),
            "model.attention=mla with a block kind that has persistent memory slots (allattn); use other kinds")
    require("sliding" not in m.attention_layers or cfg.attention.pattern == "causal", "model.attention_layers has "
            f"'sliding' layers and attention.pattern={cfg.attention.pattern}; use one or the other")
    for kind in m.pattern:
        require(kind in BLOCKS, f"model.pattern names unknown block kind '{kind}'; known kinds: {', '.join(sorted(BLOCKS))}")
    require(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len or lower data.seq_len")
    require(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    require(0 < d.valid_fraction < 1, f"data.valid_fraction must be in (0, 1), got {d.valid_fraction}")
    require(d.prefetch >= 0, f"data.prefetch must be >= 0 (0 reads on the training thread), got {d.prefetch}")
    parse_blend(d.dataset, "data.dataset")  # a malformed blend names its source
    parse_blend(d.valid_dataset, "data.valid_dataset")
    for name in ("tp", "pp", "ep", "cp"):
        require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    require(p.zero_stage in (-1, 0, 1, 2, 3), f"parallel.zero_stage must be -1 (from the JSON) or 0..3, got {p.zero_stage}")
    require(p.recompute_every >= 1, f"parallel.recompute_every must be >= 1 (1 recomputes every block), got {p.recompute_every}")
    require(p.recompute_every <= m.n_layers, f"parallel.recompute_every={p.recompute_every} is larger than the "
            f"{m.n_layers} layers (model.n_layers): no block would be recomputed; use 1..{m.n_layers}")
    require(p.zero3_experts_per_gather >= 0, "parallel.zero3_experts_per_gather must be >= 0 (0: all of a layer's "
            f"experts at once), got {p.zero3_experts_per_gather}")
    check_layout_fits_model(cfg)
    require(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    require(t.global_batch_size > 0, f"train.global_batch_size must be positive, got {t.global_batch_size}")
    require(t.micro_batch_size >= 0, f"train.micro_batch_size must be >= 0, got {t.micro_batch_size}")
    require(p.timeout_minutes > 0, f"parallel.timeout_minutes must be positive, got {p.timeout_minutes}")
    require(not (t.compile and p.recompute != "none"),
            f"train.compile=true with parallel.recompute={p.recompute!r}: compiling recomputed blocks is not supported "
            "yet (the recomputed forward replays routing state that Dynamo does not trace); set train.compile=false "
            "or parallel.recompute=none")
    require(t.max_skipped_steps >= 0 and t.skip_batches >= 0,
            "train.max_skipped_steps and train.skip_batches must be >= 0")
    for name in ("save_every_minutes", "max_minutes"):
        require(getattr(t, name) >= 0, f"train.{name} must be >= 0 (0 disables it), got {getattr(t, name)}")
    require(t.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 looks the device up), got {t.peak_tflops}")
    require(t.resume in ("", "latest") or bool(t.resume), "train.resume must be '', 'latest' or a checkpoint path")
    require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    for validate_section in (validate_moe, validate_pkm, validate_attention):
        validate_section(cfg)
