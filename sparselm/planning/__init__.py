"""The planning room: FLOP and parameter accounting and the layout planner (per-rank memory, step time, advice).

It may import model (on the meta device), parallel (virtual topologies), config and training's DeepSpeed JSON
rules; it never starts a process group.
"""
