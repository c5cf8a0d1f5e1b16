"""Product-key memory layers: config section ``pkm``, block kinds ``pkm`` and ``pkm_ffn``."""
from sparselm.model.pkm.blocks import MemoryBesideFFN, bind_shared_values, build_memory
from sparselm.model.pkm.config import PKMConfig
from sparselm.model.pkm.lookup import product_key_topk
from sparselm.model.pkm.memory import VALUE_GROUP, ProductKeyMemory
from sparselm.model.pkm.usage import SlotUsage

__all__ = ["PKMConfig", "ProductKeyMemory", "MemoryBesideFFN", "SlotUsage", "product_key_topk",
           "bind_shared_values", "build_memory", "VALUE_GROUP"]
