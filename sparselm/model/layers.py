"""Imports every module that registers a block kind (see registry.py)."""
import sparselm.model.registry  # noqa: F401  dense
import sparselm.model.pkm  # noqa: F401
import sparselm.model.sparse_attention  # noqa: F401
import sparselm.model.moe  # noqa: F401
