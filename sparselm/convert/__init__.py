"""Checkpoint conversions.  Everything goes through the canonical form: a sparselm checkpoint's
``model.safetensors`` (full tensors by global name) plus its config."""
