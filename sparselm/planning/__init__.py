"""The planning room: FLOP and parameter accounting and the layout planner (per-rank memory, step time, advice).

Modules: ``flops`` (parameters and FLOPs per token), ``assumptions`` (the estimates' hardware figures),
``holdings`` (what each rank holds, exact), ``layouts`` (candidate layouts and the trainer's checks on them),
``memory`` (per-rank GPU/host bytes), ``communication`` (bytes per collective), ``step_time``, ``planner``
(the plan of one layout), ``advice`` (search and the smallest fix) and ``report`` (text and ``main``).
Every block kind's size comes from its cost model (``sparselm.model.cost``, registered with the kind).

It may import model (on the meta device), parallel (virtual topologies), config and training's DeepSpeed JSON
rules; it never starts a process group.
"""
