#!/usr/bin/env python
"""Peak host memory of a streaming ``import-hf`` (issue 28): a synthetic sharded Mixtral-layout checkpoint
(per-expert tensors, bf16, ``model.safetensors.index.json``) of about ``--gb`` GB is written, then imported
in a fresh process that reports its RSS after imports (the baseline) and its peak (VmHWM) during the import.

  python tools/bench_import.py --gb 2 [--dir /tmp/bench_import] [--max-shard-gb 0.5]

Target: peak - baseline <= 1.5 GB for a 2 GB checkpoint (memory about one tensor or shard, not the model).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from sparselm.training.runtime import quiet_third_party
from tools.convert_checkpoint import main
import torch, safetensors, sparselm.convert.hf_import
quiet_third_party()
base = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
t = time.perf_counter()
main(['import-hf', '--input', sys.argv[1], '--output', sys.argv[2], '--max-shard-gb', sys.argv[3]])
print('RESULT', base, rss('VmHWM:'), time.perf_counter() - t)
"""


def write_checkpoint(path: Path, gb: float, shard_gb: float = 0.25) -> dict:
    """A Mixtral-layout model of about ``gb`` GB in bf16 with d_model 2048, 8 experts of width 5632."""
    import torch
    from safetensors.torch import save_file

    d, hidden, experts, vocab = 2048, 5632, 8, 32000
    per_layer = (4 * d * d // 2 + experts * 3 * d * hidden + experts * d + 2 * d) * 2
    layers = max(1, round((gb * 1e9 - 2 * vocab * d * 2) / per_layer))
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": vocab,
              "hidden_size": d, "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "num_local_experts": experts, "num_experts_per_tok": 2, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "torch_dtype": "bfloat16"}
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                       f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (d // 4, d),
                       f"{p}.self_attn.v_proj.weight": (d // 4, d), f"{p}.self_attn.o_proj.weight": (d, d),
                       f"{p}.block_sparse_moe.gate.weight": (experts, d)})
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes.update({f"{q}.w1.weight": (hidden, d), f"{q}.w3.weight": (hidden, d), f"{q}.w2.weight": (d, hidden)})
    path.mkdir(parents=True)
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).bfloat16() for n in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return {"layers": layers, "bytes": total, "files": len(shards), "largest_tensor": experts * 2 * hidden * d * 2}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--dir", default="/tmp/bench_import")
    parser.add_argument("--max-shard-gb", type=float, default=0.5)
    args = parser.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    info = write_checkpoint(root / "hf", args.gb)
    print(f"wrote {root / 'hf'}: {info['bytes'] / 1e9:.2f} GB bf16 in {info['files']} files, {info['layers']} layers, "
          f"largest output tensor {info['largest_tensor'] / 1e9:.2f} GB ({time.perf_counter() - t:.0f} s)")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "hf"), str(root / "ours"), str(args.max_shard_gb)],
                          cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    _, base, peak, seconds = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()
    base, peak = int(base), int(peak)
    print(f"import: {float(seconds):.1f} s, baseline RSS {base / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB, "
          f"peak above baseline {(peak - base) / 2**30:.2f} GiB (target <= 1.5 GB) for a "
          f"{info['bytes'] / 2**30:.2f} GiB checkpoint")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
