"""Checkpoint conversions.  Everything goes through the canonical form: a sparselm checkpoint's
``model.safetensors`` (full tensors by global name) plus its config.

Hugging Face, both ways: ``hf_family`` (what a family is: the ``Family`` record), ``hf_families`` (the
records, in export's order; adding a family is adding a record there), ``hf_import_config`` /
``hf_export_config`` (config.json <-> sparselm config, read off the record), ``hf_rope`` (rotary settings),
``hf_names`` (tensor names), ``experts`` (per-expert <-> stacked experts), ``hf_safetensors`` and ``mapped``
(the lazy readers, both ``CanonicalTensors``), ``hf_import`` / ``hf_export`` (the commands).
"""
