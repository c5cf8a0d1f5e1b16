"""Imports every module that registers a block kind (see registry.py)."""
import sparselm.model.registry  # noqa: F401  dense
