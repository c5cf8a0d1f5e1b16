"""Pipeline parallelism: the model's layers as a DeepSpeed ``PipelineModule``.

Activations between stages are ``(hidden, aux_loss, labels)``: the auxiliary losses of MoE layers
travel with the hidden states so the last stage adds them to the token loss, and the labels travel so
the (possibly vocab-parallel) head computes the loss itself.

Stages wrap the modules of a (tensor- and expert-parallel) ``SparseLM`` on the meta device and reach
DeepSpeed as ``StageSpec`` layer specs: DeepSpeed partitions by the meta modules' parameter counts and
builds only this rank's stages, which is when they are materialised (``materialize``).  The other
stages' layers never get memory on this rank and are dropped from the module afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import io

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from sparselm.errors import ConfigError
from sparselm.model.mtp import mtp_losses
from sparselm.model.transformer import layer_metrics
from sparselm.parallel.context import context_losses, sequence_piece


class EmbeddingStage(nn.Module):
    """The token embedding; under context parallelism (``piece``: the model's ``sequence_piece``) it first cuts
    this rank's piece of the inputs and of the labels that travel with the activations."""

    def __init__(self, embed: nn.Module, piece=None):
        super().__init__()
        self.embed = embed
        self.piece = piece

    def forward(self, inputs):
        input_ids, labels = inputs
        if self.piece is not None:
            input_ids, labels = self.piece(input_ids), self.piece(labels)
        h = self.embed(input_ids)
        # A zero that is part of the graph: DeepSpeed back-propagates through every float output.
        aux = h.reshape(-1)[:1].float() * 0.0
        return h, aux, labels

    def canonical(self, name: str) -> str:
        return name


class BlockStage(nn.Module):
    """One block; also averages the block's metrics over the forwards since ``pop_metrics`` (the
    pipeline engine runs micro-batches in its own order, so they are collected here)."""

    def __init__(self, block: nn.Module, layer_index: int):
        super().__init__()
        self.block = block
        self.layer_index = layer_index
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def forward(self, inputs):
        h, aux, labels = inputs
        h, layer_aux = self.block(h)
        for name, value in layer_metrics(self.layer_index, self.block).items():
            self._sums[name] = self._sums.get(name, 0) + value.cpu()
        self._count += 1
        return h, aux + layer_aux.reshape(1), labels

    def canonical(self, name: str) -> str:
        """'block.attn.q_proj.weight' -> 'layers.<i>.attn.q_proj.weight'."""
        return f"layers.{self.layer_index}.{name.removeprefix('block.')}"

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """Average over the forwards since the last call."""
        out = {k: v / self._count for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return out


class HeadStage(nn.Module):
    """Final norm, projection and token loss; keeps the detached loss parts of each micro-batch.  With
    multi-token prediction (``mtp``: the model's depths, ``first_mtp_index`` their first block's layer index)
    it also runs every depth, reading the token embedding (``mtp_embed``, a copy of the first stage's whose
    gradient is summed with it, as a tied output projection's is) and the labels."""

    def __init__(self, head: nn.Module, mtp: nn.Module | None = None, embed: nn.Module | None = None,
                 mtp_weight: float = 0.0, first_mtp_index: int = 0, cp_group=None):
        super().__init__()
        self.head = head
        self.cp_group = cp_group  # context parallelism: the losses are summed over the sequence's pieces
        self.parts: list[tuple] = []
        self.mtp, self.mtp_weight, self.first_mtp_index = mtp, mtp_weight, first_mtp_index
        if mtp is not None:
            self.mtp_embed = embed
        self._sums: dict[str, torch.Tensor] = {}

    def forward(self, inputs):
        h, aux, labels = inputs
        aux = aux.reshape(())
        if self.cp_group is not None:  # (config refuses multi-token prediction with context parallelism)
            lm_loss, aux = context_losses(*self.head.loss_terms(h, labels), aux, self.cp_group)
        else:
            lm_loss = self.head.loss(h, labels)
        if self.mtp is None:
            self.parts.append((lm_loss.detach(), aux.detach()))
            return (lm_loss + aux).reshape(1)
        losses, mtp_aux = mtp_losses(self.mtp, h, labels, self.mtp_embed, self.head)
        mtp = self.mtp_weight * torch.stack(losses).mean()
        aux = aux + mtp_aux
        self.parts.append((lm_loss.detach(), aux.detach(), mtp.detach(), [x.detach() for x in losses]))
        for index, block in self.mtp_blocks():
            for name, value in layer_metrics(index, block).items():
                self._sums[name] = self._sums.get(name, 0) + value.cpu()
        return (lm_loss + aux + mtp).reshape(1)

    def mtp_blocks(self) -> list[tuple[int, nn.Module]]:
        """(layer index, block) of the multi-token-prediction depths."""
        return [(self.first_mtp_index + k, layer.block) for k, layer in enumerate(self.mtp or [])]

    def pop_losses(self) -> dict[str, torch.Tensor]:
        """Means over the micro-batches since the last call: loss, lm_loss, aux_loss (and mtp_loss, mtpK_loss
        and the depths' blocks' metrics); empty when none ran."""
        if not self.parts:
            return {}
        mean = lambda i: torch.stack([p[i] for p in self.parts]).mean().cpu()  # noqa: E731
        lm, aux = mean(0), mean(1)
        out = {"loss": lm + aux, "lm_loss": lm, "aux_loss": aux}
        if self.mtp is not None:
            out.update(mtp_loss=mean(2), loss=lm + aux + mean(2))
            for k in range(len(self.mtp)):
                out[f"mtp{k + 1}_loss"] = torch.stack([p[3][k] for p in self.parts]).mean().cpu()
            out.update({name: value / len(self.parts) for name, value in self._sums.items()})
        self.parts.clear()
        self._sums = {}
        return out

    def canonical(self, name: str) -> str:
        """The embedding copy is the first stage's ``embed.weight``; the rest keep the model's names."""
        return "embed." + name.removeprefix("mtp_embed.") if name.startswith("mtp_embed.") else name


class StageSpec(LayerSpec):
    """One stage module for DeepSpeed's PipelineModule: ``build()`` (called only on the rank that runs the
    stage) returns it through ``materialize(module)``."""

    def __init__(self, module: nn.Module, materialize=None):
        super().__init__(type(module))
        self.module, self.materialize = module, materialize

    def build(self, log=False):
        return self.module if self.materialize is None else self.materialize(self.module)


def total_loss(output: torch.Tensor, _labels) -> torch.Tensor:
    return output.sum()


class SparseLMPipe(PipelineModule):
    """A PipelineModule over a SparseLM's stages; knows the canonical names of its parameters and, for
    tied embeddings, sums the tied matrix's gradient between the first and the last stage."""

    tied: tuple | None = None
    """(tied weight, group of the first and last stage of this lane) on those two stages."""
    canonical_aliases: dict = {}
    """Canonical names this stage holds that are the same tensor as another name (tied embeddings)."""

    def _partition_layers(self, method="uniform"):
        """DeepSpeed's partition, refused before anything is built when a stage would get no transformer
        layer (e.g. 'type:' matching only the embedding)."""
        super()._partition_layers(method)
        for stage in range(self.num_stages):
            specs = self._layer_specs[self.parts[stage]:self.parts[stage + 1]]
            # a head with multi-token-prediction depths holds transformer blocks too
            if not any(spec.typename is BlockStage or (spec.typename is HeadStage and spec.module.mtp is not None)
                       for spec in specs):
                raise ConfigError(f"parallel.pp_partition={method!r} leaves pipeline stage {stage} of {self.num_stages} "
                                  f"without a transformer layer (it gets {[s.typename.__name__ for s in specs]}); "
                                  "use parallel.pp_partition=uniform or parameters, or fewer stages")

    def _count_layer_params(self):
        """Parameter counts for partition_method='parameters', from the (meta) modules: nothing is built."""
        return [sum(p.numel() for p in spec.module.parameters() if p.requires_grad) for spec in self._layer_specs]

    def _get_frozen_parameter_names(self, layer):
        return [n for n, p in layer.module.named_parameters() if not p.requires_grad]

    def drop_other_stages(self) -> None:
        """Forget the modules of the stages other ranks run (DeepSpeed keeps every spec)."""
        for index, spec in enumerate(self._layer_specs):
            if not self._local_start <= index < self._local_stop:
                spec.module = None

    def get_tied_weights_and_groups(self):
        """DeepSpeed all-reduces each (weight, group) gradient before the data-parallel reduction."""
        pairs = super().get_tied_weights_and_groups()
        if self.tied is not None:
            pairs.append(self.tied)
        return pairs

    def block_stages(self) -> list[BlockStage]:
        return [m for m in self.forward_funcs if isinstance(m, BlockStage)]

    def head_stage(self) -> HeadStage | None:
        return next((m for m in self.forward_funcs if isinstance(m, HeadStage)), None)

    def canonical_name(self, name: str) -> str:
        """'3.block.attn.q_proj.weight' -> 'layers.2.attn.q_proj.weight'; embedding and head keep their names."""
        index, _, rest = name.partition(".")
        stage = self._modules[index]
        if isinstance(stage, BlockStage):
            return f"layers.{stage.layer_index}.{rest.removeprefix('block.')}"
        return rest


def build_pipeline(model, topology, partition_method: str = "parameters", materialize=None):
    """Wrap a ``SparseLM`` as a ``SparseLMPipe`` over DeepSpeed ``topology``.  ``materialize(stage) -> stage``
    gives a meta stage its memory and values (``stage.canonical`` maps its names to the one-process model's);
    None: ``model`` is real already.  Only this rank's stages are materialised.  Activation recomputation is the
    blocks' own (``parallel.recompute``, applied by ``parallelize``), not DeepSpeed's pipeline checkpointing."""
    stages, tied = pipeline_stages(model)
    del model  # the stages hold its modules; nothing else may keep the other stages alive
    pipe = SparseLMPipe(layers=[StageSpec(stage, materialize) for stage in stages], topology=topology,
                        loss_fn=total_loss, partition_method=partition_method)
    pipe.drop_other_stages()
    if tied:
        _tie_first_and_last_stage(pipe, topology)
    return pipe


def pipeline_stages(model) -> tuple[list[nn.Module], bool]:
    """A ``SparseLM``'s pipeline stages in order (embedding, one per block, head) and whether the embedding is
    tied to the output projection."""
    cp_group = getattr(model, "cp_group", None)  # a context-parallel model (sparselm.parallel.context)
    piece = None
    if cp_group is not None:  # a plain function: a bound method would keep the whole model (every stage) alive
        piece = functools.partial(sequence_piece, group=cp_group, size=model.cp_size, rank=model.cp_rank,
                                  zigzag=model.cp_zigzag)
    stages: list[nn.Module] = [EmbeddingStage(model.embed, piece)]
    stages += [BlockStage(block, i) for i, block in enumerate(model.layers)]
    m = model.config.model
    stages.append(HeadStage(model.head, model.mtp, model.embed, m.mtp_loss_weight, len(model.layers), cp_group))
    return stages, model.head.proj.weight is model.embed.weight or model.mtp is not None


def stage_bounds(stages: list[nn.Module], topology, rank: int, partition_method: str = "parameters") -> tuple[int, int]:
    """[start, stop) of ``stages`` that global ``rank`` of DeepSpeed ``topology`` runs: the partition
    ``build_pipeline`` gets (``SparseLMPipe._partition_layers``, DeepSpeed's with our checks), computed on paper
    without a process group or building anything; for planning (``sparselm.plan``)."""
    pipe = SparseLMPipe.__new__(SparseLMPipe)
    nn.Module.__init__(pipe)
    pipe._layer_specs = [StageSpec(stage) for stage in stages]
    pipe._topo, pipe.num_stages, pipe.global_rank, pipe.loss_fn = topology, topology.get_dim("pipe"), rank, None
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partition on rank 0
        pipe._partition_layers(partition_method)
    return pipe._local_start, pipe._local_stop


def _tie_first_and_last_stage(pipe: SparseLMPipe, topology) -> None:
    """The first stage reads the matrix as embedding, the last as output projection; one process would
    sum both gradients into one tensor, so the two copies' gradients are summed over a group of the two
    ranks of each pipeline lane.  Both copies start equal (both are materialised from the same canonical
    tensor, 'embed.weight')."""
    import torch.distributed as dist

    weight = None
    for stage in pipe.forward_funcs:
        if isinstance(stage, EmbeddingStage):
            weight = stage.embed.weight
        elif isinstance(stage, HeadStage):  # the multi-token-prediction copy of the embedding, or the tied head
            weight = stage.mtp_embed.weight if stage.mtp is not None else stage.head.proj.weight
    me = dist.get_rank()
    for lane in topology.get_axis_comm_lists("pipe"):  # every rank creates every group, in one order
        group = dist.new_group([lane[0], lane[-1]])
        if me in (lane[0], lane[-1]):
            pipe.tied = (weight, group)
        if me == lane[-1]:
            weight.ds_pipe_replicated = True  # DeepSpeed then counts it once in the gradient norm
    tied_head = any(isinstance(stage, HeadStage) and stage.head.proj.weight is weight for stage in pipe.forward_funcs)
    pipe.canonical_aliases = {"mtp_embed.weight": "embed.weight"}
    if tied_head or not any(isinstance(stage, HeadStage) for stage in pipe.forward_funcs):
        pipe.canonical_aliases["head.proj.weight"] = "embed.weight"
