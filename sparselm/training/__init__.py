"""The training room: the run (trainer, DeepSpeed engine and its JSON, steps, optimizer, guards, preflight, runtime, metric sinks).

It may import every other room (model, parallel, data, checkpoint, planning's FLOP counts); nothing imports it but
the entry points (train, evaluate, generate, plan) and tools.
"""
