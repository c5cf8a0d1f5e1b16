"""The two recipes the equivalence tests share: a parallelised model against the one-process model, and
DeepSpeed steps against one-process AdamW steps on the whole batch."""
from __future__ import annotations

import torch

from support.run import rel_error


def parallel_vs_reference(cfg1, cfg2, ids, labels, check=None, after_backward=None) -> dict:
    """Build the one-process model from ``cfg1`` and the model parallelised under ``cfg2`` (the trainer's
    path: ``parallelize``), run forward and backward on (ids, labels) in both, and return relative errors:
    ``loss``, ``logits``, ``value:NAME`` and ``grad:NAME`` for every parameter gathered to its full shape.
    ``check(model, topo)`` may assert on the parallel model before the forward and return more entries;
    ``after_backward(model, topo, ref)`` runs after both backwards (e.g. to reduce gradients as the engine
    would) and may return more entries.  Call on every rank of a world that fits ``cfg2``."""
    from sparselm.model import build_model
    from sparselm.parallel import parallelize
    from sparselm.parallel.pieces import assemble, placements
    from sparselm.parallel.topology import Topology

    ref = build_model(cfg1)
    ref_logits = ref(ids)
    ref_out = ref(ids, labels)
    ref_out.loss.backward()
    ref_params = dict(ref.named_parameters())
    topo = Topology(cfg2)
    try:
        model = parallelize(build_model(cfg2), cfg2, topo)
        extra = check(model, topo) if check is not None else None
        logits = model(ids)
        out = model(ids, labels)
        out.loss.backward()
        late = after_backward(model, topo, ref) if after_backward is not None else None
        params = dict(model.named_parameters())
        assert params.keys() == ref_params.keys()
        groups = {"tp": topo.tp_group, "ep": topo.ep_group}

        def full_tensor(t, p, topo):
            return assemble(t, placements(p), groups)
  # layout-free names, nothing extra
        errors = {"logits": rel_error(logits, ref_logits), "loss": rel_error(out.loss, ref_out.loss)}
        for name, p in params.items():
            assert full_tensor(p.detach(), p, topo).shape == ref_params[name].shape, name
            errors[f"value:{name}"] = rel_error(full_tensor(p.detach(), p, topo), ref_params[name].detach())
            errors[f"grad:{name}"] = rel_error(full_tensor(p.grad, p, topo), ref_params[name].grad)
        return {**errors, **(extra or {}), **(late or {})}
    finally:
        topo.teardown()


def adamw_reference_steps(model, cfg, steps) -> list[float]:
    """One-process AdamW on ``model`` with sparselm's parameter groups, learning rates (``set_lr`` at
    optim.lr), clipping and hyper-parameters.  ``steps``: per optimizer step, the (inputs, labels) pairs
    of every rank; the loss is their mean, i.e. the whole batch.  Returns the gradient norms before
    clipping."""
    from sparselm.training.optim import param_groups, set_lr

    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, foreach=False)
    set_lr(opt, o.lr)
    norms = []
    for pairs in steps:
        (sum(model(x, y).loss for x, y in pairs) / len(pairs)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).item())
        opt.step()
        opt.zero_grad()
    return norms
