"""import-hf: a Hugging Face model directory of a supported family -> a sparselm checkpoint, streamed.

The source is read tensor by tensor through safetensors' memory map (``model.safetensors.index.json`` and its
shards, or a single ``model.safetensors``), in whatever dtype it is stored (bf16, fp16, fp32 are kept as
they are); routed experts stored one tensor per expert (as published checkpoints and ``save_pretrained`` hold
them) or fused (transformers 5's in-memory names) become sparselm's fused ``[E, 2H, D]`` / ``[E, D, H]``
tensors.  ``HFTensors`` is a lazy reader for ``write_model_checkpoint``, so peak memory is about one output
shard (``max_shard_bytes``), not the model.  Every check (config, files present and complete, each tensor
found with the right shape, no tensor left unread, no quantized dtype) runs before anything is written.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from sparselm.convert import hf_families as fam
from sparselm.errors import ConversionError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class SafetensorsDir:
    """Name -> (file, shape, dtype) of every tensor of a Hugging Face model directory, from the file headers
    only; ``get(name)`` reads one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [f.name for f in sorted(self.path.glob("*.safetensors"))]
            if not files:
                raise ConversionError(f"'{self.path}' has no .safetensors weights (pytorch_model.bin is not read: "
                                      "it would unpickle arbitrary objects); re-save it with save_pretrained()")
        self.file_of, self.shapes, self.dtypes = {}, {}, {}
        for name in files:
            for tensor, (shape, dtype) in self._header(self.path / name).items():
                self.file_of[tensor], self.shapes[tensor], self.dtypes[tensor] = name, tuple(shape), dtype
        self._open: dict[str, object] = {}

    @staticmethod
    def _header(file: Path) -> dict:
        if not file.is_file():
            raise ConversionError(f"shard '{file}' named by model.safetensors.index.json is missing")
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            header = f.read(n) if 0 < n <= size - 8 else b""
        try:
            meta = json.loads(header)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise ConversionError(f"shard '{file}' is truncated or not a safetensors file (unreadable header)")
        meta.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in meta.values()), default=0)
        if 8 + n + end > size:
            raise ConversionError(f"shard '{file}' is truncated: {size} bytes, its header describes {8 + n + end}")
        return {k: (v["shape"], v["dtype"]) for k, v in meta.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.file_of[name]
        if file not in self._open:
            self._open = {file: safe_open(str(self.path / file), framework="pt")}  # one file mapped at a time
        return self._open[file].get_tensor(name)


class HFTensors:
    """sparselm's canonical tensors of the model in an HF directory, each built when read (``[name]``); with
    ``keys()``, ``shapes`` and ``dtype(name)`` from the headers: the reader ``write_model_checkpoint`` streams."""

    def __init__(self, source: SafetensorsDir, recipes: dict, shapes: dict, dtypes: dict):
        self.source, self.recipes, self.shapes, self._dtypes = source, recipes, shapes, dtypes

    def keys(self):
        return list(self.recipes)

    def __len__(self):
        return len(self.recipes)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        kind, parts = self.recipes[name]
        if kind == "copy":
            return self.source.get(parts)
        if kind == "gate_up":  # per expert: [gate_e; up_e] stacked over experts
            out = torch.empty(self.shapes[name], dtype=self._dtypes[name])
            for e, (gate, up) in enumerate(parts):
                h = out.shape[1] // 2
                out[e, :h], out[e, h:] = self.source.get(gate), self.source.get(up)
            return out
        out = torch.empty(self.shapes[name], dtype=self._dtypes[name])  # down, per expert
        for e, down in enumerate(parts):
            out[e] = self.source.get(down)
        return out


def read_config(hf_dir: Path) -> dict:
    config = Path(hf_dir) / "config.json"
    if not config.is_file():
        raise ConversionError(f"'{hf_dir}' has no config.json; give a Hugging Face model directory")
    return json.loads(config.read_text())


def open_hf_model(hf_dir: Path, expected: dict[str, tuple], hf: dict, kinds: list[str]) -> HFTensors:
    """The lazy reader of ``hf_dir`` for a sparselm model whose tensors have ``expected`` shapes; raises
    ConversionError naming a missing tensor, a wrong shape, a quantized dtype or a tensor sparselm would drop."""
    family = hf["model_type"]
    src = SafetensorsDir(hf_dir)
    for name, dtype in src.dtypes.items():
        if dtype not in DTYPES:
            raise ConversionError(f"tensor {name} has dtype {dtype} (quantized weights); supported: bf16, fp16, fp32")
    recipes, shapes, dtypes, used = {}, {}, {}, set()
    renames = {**fam.GLOBAL}
    for i, kind in enumerate(kinds):
        renames.update(fam.layer_renames(family, i, kind, fused=f"model.layers.{i}.mlp.experts.gate_up_proj" in src))
    for ours, shape in expected.items():
        if ours in renames:
            theirs = renames[ours]
            if theirs not in src:
                raise ConversionError(f"'{hf_dir}' is missing tensor {theirs} (for {ours})")
            recipes[ours], dtypes[ours] = ("copy", theirs), DTYPES[src.dtypes[theirs]]
            used.add(theirs)
            got = src.shapes[theirs]
        elif ours.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            i, what = int(ours.split(".")[1]), ours.rsplit(".", 1)[1]
            fused = f"model.layers.{i}.mlp.experts.{what}"
            if fused in src:
                recipes[ours], got = ("copy", fused), src.shapes[fused]
                used.add(fused)
                names = [fused]
            else:
                per = [fam.expert_names(family, i, e) for e in range(shape[0])]
                names = [n for p in per for n in (p if what == "gate_up_proj" else p[2:])]
                for n in names:
                    if n not in src:
                        raise ConversionError(f"'{hf_dir}' is missing tensor {n} (an expert of {ours})")
                used.update(names)
                if what == "gate_up_proj":
                    recipes[ours] = ("gate_up", [p[:2] for p in per])
                    g = src.shapes[per[0][0]]
                    got = (len(per), 2 * g[0], g[1])
                else:
                    recipes[ours] = ("down", [p[2] for p in per])
                    got = (len(per), *src.shapes[per[0][2]])
            dtypes[ours] = DTYPES[src.dtypes[names[0]]]
        else:
            raise ConversionError(f"'{hf_dir}': no {family} tensor maps to sparselm's {ours}")
        if tuple(got) != tuple(shape):
            raise ConversionError(f"'{hf_dir}': {ours} would have shape {tuple(got)}, the model {tuple(shape)}")
        shapes[ours] = tuple(shape)
    n = hf["num_hidden_layers"]
    left = [k for k in src.file_of if k not in used and not k.endswith("rotary_emb.inv_freq")
            and not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)  # GLM's multi-token-prediction layers
            and not (k == "lm_head.weight" and hf.get("tie_word_embeddings"))]
    if left:
        raise ConversionError(f"'{hf_dir}' has tensors sparselm has no place for (e.g. biases it does not compute): "
                              f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
    return HFTensors(src, recipes, shapes, dtypes)
