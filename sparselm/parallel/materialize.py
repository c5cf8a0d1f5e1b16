"""Each rank materialises only its own pieces of the one-process model.

The trainer builds the one-process model on the meta device (``build_model(cfg, device="meta")``: no
parameter memory), parallelises it (every parameter becomes a meta *piece*, ``sparselm.parallel.pieces``),
and then ``materialize_pieces`` allocates each piece and fills it from a source of canonical tensors, one
tensor at a time:
- ``InitSource`` (sparselm.model.init): the seeded initial values, drawn module by module from a second meta
  copy of the model, so every layout starts from exactly the one-process weights;
- ``ShardReader`` (sparselm.checkpoint.shards): a checkpoint's ``model/`` shards, of which each rank reads
  exactly the boxes of its pieces, so a resumed run skips random init entirely and never holds a whole
  tensor of another rank (``LazyTensors``, format 1's single file, is read tensor by tensor).
The peak is this rank's pieces plus one full tensor (or one module's tensors when initialising); a piece
of a tensor drawn or stored row by row (experts) is read or drawn row by row (``source.rows``), so expert
parallelism never holds another rank's experts, and tensor parallelism one whole expert at most.  As
torchtitan does with ``to_empty`` + ``init_weights``, with the values layout-free.
"""
from __future__ import annotations

import torch

from sparselm.model.init import InitSource, check_materialized, materialize
from sparselm.parallel.boxes import piece_layout, piece_views
from sparselm.parallel.pieces import piece, placements, shard_rank_size


def tied_aliases(reference: torch.nn.Module) -> dict[str, str]:
    """Every other name of a tied or shared parameter of the one-process model -> its first name (the one a
    checkpoint stores)."""
    first, aliases = {}, {}
    for name, p in reference.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name:
            aliases[name] = owner
    return aliases


@torch.no_grad()
def materialize_pieces(module: torch.nn.Module, source, groups: dict, canonical=None, what: str = "the model",
                       load_buffers: bool = False, partitioner=None) -> torch.nn.Module:
    """Allocate and fill every meta parameter of ``module`` with this rank's piece of its canonical tensor
    from ``source``; with ``load_buffers``, persistent buffers the source holds are loaded too (a checkpoint's
    MoE selection bias, PKM usage statistics).  ``canonical(local name) -> canonical name``; ``groups``:
    'tp'/'ep' -> process group.  ``partitioner`` (``sparselm.parallel.zero3.Zero3Partitioner``) partitions each
    parameter as soon as it is filled.  Raises ValueError naming any tensor left on the meta device."""
    from sparselm.parallel.canonical import unchunked

    rename = canonical or (lambda name: name)

    def canonical(name):  # ZeRO-3 gather chunks of experts map back to their canonical tensor
        return unchunked(rename(name))

    def take(source, name, param):
        shards = placements(param)
        if hasattr(source, "read_into"):  # a sharded checkpoint: read exactly this piece's boxes
            out = torch.empty(param.shape, dtype=torch.float32)
            _, segs = piece_layout(param.shape, shards, groups)
            source.read_into({name: [(box.offsets, view) for box, view in piece_views(out, segs)]})
            return out
        if hasattr(source, "rows") and all(s.blocks == 1 for s in shards if s.dim == 0):
            rows = _rows_piece(source, name, param, shards, groups)
            if rows is not None:
                return rows
        return piece(source.full(name), shards, groups)

    if partitioner is not None:
        partitioner.prepare(module)
    materialize(module, source, canonical, take, after=partitioner.partition if partitioner is not None else None)
    if load_buffers:
        persistent = set(module.state_dict(keep_vars=True))
        for name, buf in module.named_buffers():
            if name in persistent and canonical(name) in source:
                buf.copy_(piece(source.full(canonical(name)), placements(buf), groups))
    check_materialized(module, what)
    return module


def _rows_piece(source, name, param, shards, groups) -> torch.Tensor | None:
    """This rank's piece read or drawn row by row along dim 0 (``source.rows``; None where the source cannot):
    the rank's rows at once when dim 0 is all that is cut (experts over ep, then in ZeRO-3 gather chunks),
    else one row at a time, each cut by the other placements (experts' hidden width over tp), so at most one
    full row is held besides the piece.  Cuts of dim 0 commute with cuts of other dimensions."""
    head = [s for s in shards if s.dim == 0]
    rest = tuple(s for s in shards if s.dim != 0)
    count = param.shape[0]
    rows, first = count, 0
    for shard in head:
        rows *= shard_rank_size(shard, groups)[1]
    for shard in head:  # nested cuts of the rows, outermost first
        index, n = shard_rank_size(shard, groups)
        rows //= n
        first += index * rows
    if not rest:
        return source.rows(name, first, count)
    row = source.rows(name, first, 1)
    if row is None:
        return None
    out = torch.empty(param.shape, dtype=param.dtype)
    for i in range(count):
        if i:
            row = source.rows(name, first + i, 1)
        out[i:i + 1].copy_(piece(row, rest, groups))
    return out


def build_sharded(cfg, topo, tensors=None, source=None, partitioner=None) -> torch.nn.Module:
    """This rank's module of the model ``cfg`` describes under ``topo``: the parallelised model (pp = 1) or its
    pipeline stages (a ``SparseLMPipe``), every parameter its piece, nothing else allocated.  Values from
    ``tensors`` (a checkpoint's ``LazyTensors``: persistent buffers too) or else the seeded init
    (``source`` overrides, e.g. an instrumented ``InitSource``).  Under ZeRO-3, ``partitioner``
    (``sparselm.parallel.zero3.Zero3Partitioner``) partitions every parameter as it is filled, so the rank never
    holds its whole pieces."""
    from sparselm.model import build_model
    from sparselm.parallel import parallelize
    from sparselm.parallel.pipeline import build_pipeline

    reference = build_model(cfg, device="meta")
    if tensors is not None:
        tensors.aliases = tied_aliases(reference)
        source = tensors
    elif source is None:
        source = InitSource(reference, cfg)
    groups, load_buffers = {"tp": topo.tp_group, "ep": topo.ep_group}, tensors is not None
    model = parallelize(build_model(cfg, device="meta"), cfg, topo)
    if topo.pp == 1:
        return materialize_pieces(model, source, groups, load_buffers=load_buffers, partitioner=partitioner)

    def materialize_stage(stage):
        return materialize_pieces(stage, source, groups, stage.canonical, f"pipeline stage {type(stage).__name__}",
                                  load_buffers, partitioner)

    return build_pipeline(model, topo.ds_topology, cfg.parallel.pp_partition, materialize_stage)


def held_pieces(cfg, topo, model=None) -> dict[str, torch.nn.Parameter]:
    """The pieces ``build_sharded(cfg, topo)`` gives this rank, on the meta device (nothing allocated), by
    canonical name (a tied matrix once, under its first name): the same ``parallelize`` and pipeline partition,
    without materialising.  With a ``topology.VirtualTopology`` it needs no process group: what any rank of
    any layout holds, counted on paper (``sparselm.plan``).  ``model``: the parallelised meta model of an
    earlier call for a rank with the same tp and ep degrees, reused (such ranks' pieces differ only in their
    offsets, and pipeline stages only in which layers they take)."""
    from sparselm.model import build_model
    from sparselm.parallel import parallelize
    from sparselm.parallel.pipeline import pipeline_stages, stage_bounds

    if model is None:
        model = parallelize(build_model(cfg, device="meta"), cfg, topo)
    if topo.pp == 1:
        named = [(name, p) for name, p in model.named_parameters()]
    else:
        stages, _ = pipeline_stages(model)
        start, stop = stage_bounds(stages, topo.ds_topology, topo.rank, cfg.parallel.pp_partition)
        named = [(stage.canonical(name), p) for stage in stages[start:stop] for name, p in stage.named_parameters()]
    out, seen = {}, set()
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def reachable_parameters(root) -> int:
    """Elements of the distinct parameters with memory (not meta) reachable from ``root`` through modules,
    containers and the attributes of sparselm's and DeepSpeed's pipeline objects (its layer specs): what
    a module keeps alive (a ZeRO-3 parameter: its partition, plus its data while gathered).  For tests and
    ``tools/bench_memory.py``."""
    seen, count, stack = set(), 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, torch.nn.Parameter) and not obj.is_meta:
                count += obj.numel()  # a ZeRO-3 parameter's data is empty unless gathered; its partition:
                if getattr(obj, "ds_tensor", None) is not None:
                    count += obj.ds_tensor.numel()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module) or (
                hasattr(obj, "__dict__") and type(obj).__module__.startswith(("sparselm", "deepspeed.runtime.pipe"))):
            stack.extend(vars(obj).values())
    return count
