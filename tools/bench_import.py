#!/usr/bin/env python
"""Peak host memory of a streaming ``import-hf`` (issue 28): a synthetic sharded Mixtral-layout checkpoint
(per-expert tensors, bf16, ``model.safetensors.index.json``) of about ``--gb`` GB is written, then imported
in a fresh process that reports its RSS after imports (the baseline) and its peak (VmHWM) during the import.
``--family gpt_oss_mxfp4`` (issue 36) writes a gpt-oss-20b-shaped checkpoint instead (d_model 2880, 32 experts
of width 2880, vocabulary cut to 32000) whose routed experts are MXFP4 ``*_blocks`` / ``*_scales``, as published:
the import dequantizes them to bf16 (four times their stored size) tensor by tensor.  ``--family deepseek_v3_fp8``
writes a DeepSeek-V3-layout checkpoint (multi-head latent attention, a dense first layer, routed and shared
experts), its layer weights block-scaled fp8 e4m3 with ``weight_scale_inv`` in 128 x 128 blocks and widths that
are no multiple of 128 (issue 35): the import dequantizes them to bf16 tensor by tensor.

  python tools/bench_import.py --gb 2 [--family mixtral|gpt_oss_mxfp4|deepseek_v3_fp8] [--dir /tmp/bench_import] [--max-shard-gb 0.5]

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


def save_sharded(path: Path, tensors, config: dict, shard_gb: float) -> tuple[int, int]:
    """Write (name, tensor) pairs, produced one at a time, as safetensors shards of about ``shard_gb`` GB with
    an index and ``config`` as config.json, as transformers' ``save_pretrained`` lays them out.  Returns
    (bytes written, files)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    weight_map, shard, size, total, files = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, files
        if shard:
            files += 1
            file = f"model-{files:05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        shard, size = {}, 0

    for name, tensor in tensors:
        shard[name] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        size, total = size + nbytes, total + nbytes
        if size > shard_gb * 1e9:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return total, files


def write_checkpoint(path: Path, gb: float, shard_gb: float = 0.25) -> dict:
    """A Mixtral-layout model of about ``gb`` GB in bf16 with d_model 2048, 8 experts of width 5632."""
    import torch

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
    gen = torch.Generator().manual_seed(0)
    total, files = save_sharded(path, ((n, (torch.randn(shape, generator=gen) * 0.02).bfloat16())
                                       for n, shape in shapes.items()), config, shard_gb)
    return {"layers": layers, "bytes": total, "files": files, "largest_tensor": experts * 2 * hidden * d * 2}


def write_gpt_oss_mxfp4(path: Path, gb: float, shard_gb: float = 0.25) -> dict:
    """A gpt-oss-20b-shaped model of at least ``gb`` GB as stored (experts MXFP4, the rest bf16), vocabulary 32000."""
    import torch

    d, inter, experts, vocab, heads, kv, hd = 2880, 2880, 32, 32000, 64, 8, 64
    groups_in, groups_down = d // 32, inter // 32
    per_layer = (experts * 2 * inter * groups_in * 17 + experts * d * groups_down * 17  # blocks (16 B) + scales (1 B)
                 + 2 * (2 * d * heads * hd + 2 * d * kv * hd + experts * (d + 2 * inter + 1) + 2 * d))
    layers = max(1, math.ceil((gb * 1e9 - 2 * vocab * d * 2) / per_layer))  # at least ``gb``
    config = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads, "head_dim": hd,
              "num_key_value_heads": kv, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "num_local_experts": experts, "num_experts_per_tok": 4, "tie_word_embeddings": False, "sliding_window": 128,
              "attention_bias": True, "swiglu_limit": 7.0,
              "layer_types": [("full_attention" if i % 2 else "sliding_attention") for i in range(layers)],
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                  "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router"]},
              "torch_dtype": "bfloat16"}
    specs = {"model.embed_tokens.weight": ((vocab, d), "bf16"), "model.norm.weight": ((d,), "bf16"),
             "lm_head.weight": ((vocab, d), "bf16")}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                            "self_attn.q_proj.weight": (heads * hd, d), "self_attn.q_proj.bias": (heads * hd,),
                            "self_attn.k_proj.weight": (kv * hd, d), "self_attn.k_proj.bias": (kv * hd,),
                            "self_attn.v_proj.weight": (kv * hd, d), "self_attn.v_proj.bias": (kv * hd,),
                            "self_attn.o_proj.weight": (d, heads * hd), "self_attn.o_proj.bias": (d,),
                            "self_attn.sinks": (heads,), "mlp.router.weight": (experts, d),
                            "mlp.router.bias": (experts,), "mlp.experts.gate_up_proj_bias": (experts, 2 * inter),
                            "mlp.experts.down_proj_bias": (experts, d)}.items():
            specs[f"{p}.{name}"] = (shape, "bf16")
        specs[f"{p}.mlp.experts.gate_up_proj_blocks"] = ((experts, 2 * inter, groups_in, 16), "u8")
        specs[f"{p}.mlp.experts.gate_up_proj_scales"] = ((experts, 2 * inter, groups_in), "scale")
        specs[f"{p}.mlp.experts.down_proj_blocks"] = ((experts, d, groups_down, 16), "u8")
        specs[f"{p}.mlp.experts.down_proj_scales"] = ((experts, d, groups_down), "scale")
    gen = torch.Generator().manual_seed(0)

    def make(shape, kind):
        if kind == "u8":
            return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        if kind == "scale":
            return torch.randint(118, 124, shape, generator=gen, dtype=torch.uint8)
        return (torch.randn(shape, generator=gen) * 0.02).bfloat16()

    total, files = save_sharded(path, ((n, make(*spec)) for n, spec in specs.items()), config, shard_gb)
    return {"layers": layers, "bytes": total, "files": files, "largest_tensor": experts * 2 * inter * d * 2}


def deepseek_v3_fp8_shapes(gb: float) -> tuple[dict, dict, set, int]:
    """(config.json, name -> shape, the names stored in fp8, largest output tensor bytes) of a DeepSeek-V3-layout
    model of about ``gb`` GB of fp8 layer weights: d_model 2048, 16 heads (query latent 768, key/value latent
    512, 128 + 64 query/key channels, values of 128), a dense first layer of width 5000, then 32 routed experts
    of width 1000 and a shared one."""
    d, heads, qr, kr, nope, rope, v, experts, hidden, dense, vocab = 2048, 16, 768, 512, 128, 64, 128, 32, 1000, 5000, 32000
    attn = {"self_attn.q_a_proj.weight": (qr, d), "self_attn.q_b_proj.weight": (heads * (nope + rope), qr),
            "self_attn.kv_a_proj_with_mqa.weight": (kr + rope, d), "self_attn.kv_b_proj.weight": (heads * (nope + v), kr),
            "self_attn.o_proj.weight": (d, heads * v)}
    norms = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_a_layernorm.weight": (qr,), "self_attn.kv_a_layernorm.weight": (kr,)}
    per_moe_layer = sum(math.prod(s) for s in attn.values()) + (experts + 1) * 3 * d * hidden
    layers = 1 + max(1, round((gb * 1e9 - 3 * d * dense) / per_moe_layer))
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": vocab,
              "hidden_size": d, "intermediate_size": dense, "moe_intermediate_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads, "q_lora_rank": qr, "kv_lora_rank": kr,
              "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v, "n_routed_experts": experts,
              "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
              "routed_scaling_factor": 2.5, "norm_topk_prob": True, "first_k_dense_replace": 1,
              "num_nextn_predict_layers": 0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
              "hidden_act": "silu", "tie_word_embeddings": False, "rope_interleave": True,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    fp8 = set()
    for i in range(layers):
        p = f"model.layers.{i}"
        mlp = {f"mlp.{n}.weight": s for n, s in (("gate_proj", (dense, d)), ("up_proj", (dense, d)),
                                                 ("down_proj", (d, dense)))} if i == 0 else {}
        if i:
            for e in [*range(experts), "shared"]:
                q = "mlp.shared_experts" if e == "shared" else f"mlp.experts.{e}"
                mlp.update({f"{q}.gate_proj.weight": (hidden, d), f"{q}.up_proj.weight": (hidden, d),
                            f"{q}.down_proj.weight": (d, hidden)})
        for name, shape in {**attn, **mlp}.items():
            shapes[f"{p}.{name}"] = shape
            fp8.add(f"{p}.{name}")
        shapes.update({f"{p}.{n}": s for n, s in norms.items()})
        if i:
            shapes.update({f"{p}.mlp.gate.weight": (experts, d), f"{p}.mlp.gate.e_score_correction_bias": (experts,)})
    return config, shapes, fp8, experts * 2 * hidden * d * 2


def write_fp8_checkpoint(path: Path, gb: float, shard_gb: float = 0.25) -> dict:
    """``deepseek_v3_fp8_shapes`` written as sharded safetensors: fp8 weights with fp32 ``weight_scale_inv``,
    the rest bf16."""
    import torch

    config, shapes, fp8, largest = deepseek_v3_fp8_shapes(gb)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            if name in fp8:
                yield name, torch.randn(shape, generator=gen).to(torch.float8_e4m3fn)
                blocks = tuple(math.ceil(n / 128) for n in shape)
                yield name + "_scale_inv", torch.rand(blocks, generator=gen) * 0.01 + 0.001
            else:
                yield name, (torch.randn(shape, generator=gen) * 0.02).bfloat16()

    total, files = save_sharded(path, tensors(), config, shard_gb)
    return {"layers": config["num_hidden_layers"], "bytes": total, "files": files, "largest_tensor": largest}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--dir", default="/tmp/bench_import")
    parser.add_argument("--max-shard-gb", type=float, default=0.5)
    parser.add_argument("--family", "--layout", dest="family", choices=["mixtral", "gpt_oss_mxfp4", "deepseek_v3_fp8"],
                        default="mixtral", help="mixtral: per-expert bf16 tensors; gpt_oss_mxfp4: gpt-oss with MXFP4 "
                        "experts; deepseek_v3_fp8: DeepSeek-V3 with block-scaled fp8 weights")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    writer = {"gpt_oss_mxfp4": write_gpt_oss_mxfp4, "deepseek_v3_fp8": write_fp8_checkpoint}.get(args.family,
                                                                                                write_checkpoint)
    info = writer(root / "hf", args.gb)
    stored = {"gpt_oss_mxfp4": "MXFP4 experts + bf16", "deepseek_v3_fp8": "fp8 + bf16"}.get(args.family, "bf16")
    print(f"wrote {root / 'hf'}: {info['bytes'] / 1e9:.2f} GB {stored} in {info['files']} files, {info['layers']} layers, "
          f"largest output tensor {info['largest_tensor'] / 1e9:.2f} GB ({time.perf_counter() - t:.0f} s)")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "hf"), str(root / "ours"), str(args.max_shard_gb)],
                          cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    _, base, peak, seconds = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()
    base, peak = int(base), int(peak)
    out_bytes = sum(f.stat().st_size for f in (root / "ours").rglob("*.safetensors"))
    target = ("target <= 1.5 GB" if args.family == "mixtral" else
              f"largest output tensor {info['largest_tensor'] / 2**30:.2f} GiB, written {out_bytes / 2**30:.2f} GiB")
    print(f"import: {float(seconds):.1f} s, baseline RSS {base / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB, "
          f"peak above baseline {(peak - base) / 2**30:.2f} GiB ({target}) for a "
          f"{info['bytes'] / 2**30:.2f} GiB checkpoint")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
