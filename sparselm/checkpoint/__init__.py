"""The checkpoint room: the layout-free format on disk (canonical tensor names, shards, engine state, integrity).

It may import torch, safetensors, torch.distributed.checkpoint, sparselm.errors, sparselm.config and the
parallel room's piece descriptions; nothing from training/ (the trainer calls it, not the other way round).
"""
