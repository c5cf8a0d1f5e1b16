"""Hugging Face families: import-hf and export-hf against transformers' own modeling code.

Every family is a tiny random model built offline with transformers' classes, its distinctive options on
(Qwen2-MoE's shared-expert gate and q/k/v biases, Qwen3's head_dim != d_model / heads, OLMoE's full-width q/k
norm and clip_qkv, Llama 3 rope scaling, Llama's attention_bias on q, k, v and o (Mistral's, ignored by
transformers, ignored too), GLM-4-MoE's group-limited sigmoid routing, partial rotary and
dense first layer, Mistral / Qwen2 sliding windows shorter than the sequence, gpt-oss's sinks, q/k/v/o biases,
alternating windows, yarn without truncation, biased router and experts, interleaved gate/up and a clamped
SwiGLU whose limit the tiny weights reach, and its MXFP4 experts; dots1's q/k/v/o biases, windows from
max_window_layers without a switch and GLM-4-MoE's routing, each switch both ways; MiniMax-M2's full-width q/k
norm, partial rotary through the legacy rotary_dim and its selection bias stored on the MoE block).  Tolerances:
logits within 1e-5 in fp32 (both sides compute the same operations; only summation order differs).
"""
import functools
import json

import pytest
import torch

from sparselm.errors import ConversionError
from support.hf_models import max_diff, move_from_init, save_hf, train_imported
from tools.convert_checkpoint import main as convert

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")

VOCAB, SEQ = 288, 40
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def family_config(family: str):
    """The family's transformers config with its distinctive options switched on."""
    T = transformers
    if family == "llama":
        return T.LlamaConfig(**COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16})
    if family == "llama_yarn":
        return T.LlamaConfig(**COMMON, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                        "original_max_position_embeddings": 32})
    if family == "llama_linear":
        return T.LlamaConfig(**{**COMMON, "tie_word_embeddings": True}, attention_bias=True,  # q, k, v and o biased
                             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if family == "mistral":
        return T.MistralConfig(**COMMON, sliding_window=8, head_dim=24, attention_bias=True)  # Mistral ignores it
    if family == "qwen2":
        return T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if family == "qwen3":
        return T.Qwen3Config(**COMMON, head_dim=32)
    if family == "mixtral":
        return T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, shared_expert_intermediate_size=64,
                                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0])
    if family == "qwen2_moe_shared40":  # a shared expert whose width is no multiple of the routed experts'
        return T.Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, shared_expert_intermediate_size=40,
                                norm_topk_prob=True, qkv_bias=False)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, head_dim=32, norm_topk_prob=True)
    if family == "olmoe":
        return T.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, clip_qkv=0.6, norm_topk_prob=False)
    if family == "glm4_moe":
        return T.Glm4MoeConfig(**COMMON, **MOE, n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1,
                               n_shared_experts=1, use_qk_norm=True, attention_bias=True, routed_scaling_factor=1.8,
                               norm_topk_prob=True)
    if family == "gpt_oss":
        return T.GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=24, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=8, swiglu_limit=0.3, swiglu_alpha=1.702,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                               "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                               "original_max_position_embeddings": 32})
    if family == "dots1":  # q/k/v/o biases, a window in the layers from max_window_layers, groups, renormalised
        return T.Dots1Config(**COMMON, **MOE, n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                             first_k_dense_replace=1, routed_scaling_factor=1.8, norm_topk_prob=True,
                             attention_bias=True, sliding_window=8, max_window_layers=1)
    if family == "dots1_plain":  # each switch the other way: no biases, no window, no groups, raw weights, tied
        return T.Dots1Config(**{**COMMON, "tie_word_embeddings": True}, **MOE, n_routed_experts=4, n_shared_experts=2,
                             first_k_dense_replace=0, norm_topk_prob=False, attention_bias=False, sliding_window=None)
    if family == "minimax_m2":  # partial rotary through the legacy rotary_dim
        return T.MiniMaxM2Config(**{**COMMON, "intermediate_size": 32}, head_dim=32, num_local_experts=4,
                                 num_experts_per_tok=2, rotary_dim=16, bos_token_id=None, eos_token_id=None)
    if family == "minimax_m2_whole":  # whole-head rotary (no rotary_dim), tied, one kv head per query head
        return T.MiniMaxM2Config(**{**COMMON, "intermediate_size": 32, "num_key_value_heads": 4, "tie_word_embeddings":
                                    True}, head_dim=24, num_local_experts=4, num_experts_per_tok=3,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 32},
                                 bos_token_id=None, eos_token_id=None)
    if family == "ernie4_5_moe":  # MoE layers 1 and 3 of 4 (interval 2), shared experts, untied; more in test_hf_ernie
        return T.Ernie4_5_MoeConfig(**{**COMMON, "num_hidden_layers": 4}, moe_intermediate_size=32, moe_num_experts=4,
                                    moe_k=2, moe_num_shared_experts=2, moe_layer_interval=2)
    raise ValueError(family)


FAMILIES = ["llama", "llama_yarn", "llama_linear", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
            "qwen2_moe_shared40", "qwen3_moe", "olmoe", "glm4_moe", "gpt_oss", "dots1", "dots1_plain", "minimax_m2",
            "minimax_m2_whole"]


def tiny_hf_model(family: str, seed: int = 0):
    """A random model of ``family`` whose weights are all far from their init (norm weights, biases and GLM's
    selection bias included), so every tensor's mapping matters."""
    torch.manual_seed(seed)
    return move_from_init(transformers.AutoModelForCausalLM.from_config(family_config(family)).eval())


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(tmp_path, family):
    from sparselm import load_model

    hf = tiny_hf_model(family)
    save_hf(hf, tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # sharded, with an index
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    diff = max_diff(hf, ours, ids)
    print(f"{family}: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


CARRIED = {  # the distinctive options each family's import must carry (checked in the sparselm config)
    "llama": {"model.rope.scaling": "llama3", "model.rope.factor": 8.0, "model.rope.original_max_seq_len": 16},
    "llama_yarn": {"model.rope.scaling": "yarn", "model.rope.attention_factor": pytest.approx(1.1386294)},
    "llama_linear": {"model.rope.scaling": "linear", "model.tie_embeddings": True},
    "mistral": {"model.head_dim": 24, "model.sliding_window": 8, "model.attention_layers": ["sliding"]},
    "qwen2": {"model.qkv_bias": True, "model.attention_layers": ["full", "sliding"]},
    "qwen3": {"model.head_dim": 32, "model.qk_norm": "per_head"},
    "mixtral": {"model.pattern": ["moe", "moe"], "moe.renormalize": True},
    "qwen2_moe": {"model.pattern": ["dense", "moe"], "moe.shared_expert_gate": True, "moe.num_shared_experts": 2,
                  "model.qkv_bias": True, "moe.renormalize": False},
    "qwen2_moe_shared40": {"moe.num_shared_experts": 1, "moe.shared_expert_hidden": 40, "model.qkv_bias": False},
    "qwen3_moe": {"model.qk_norm": "per_head", "moe.renormalize": True},
    "olmoe": {"model.qk_norm": "full", "model.clip_qkv": 0.6},
    "glm4_moe": {"model.pattern": ["dense", "moe"], "moe.n_group": 2, "moe.topk_group": 1, "moe.score_func": "sigmoid",
                 "moe.routed_scaling_factor": 1.8, "model.rotary_fraction": 0.5, "moe.bias_balancing": True},
    "gpt_oss": {"model.attention_sinks": True, "model.qkv_bias": True, "model.o_bias": True, "moe.router_bias": True,
                "model.attention_layers": ["sliding", "full"], "model.sliding_window": 8, "moe.expert_biases": True,
                "moe.swiglu_limit": 0.3, "moe.swiglu_alpha": 1.702, "moe.swiglu_up_offset": 1.0,
                "model.rope.truncate": False, "model.rope.scaling": "yarn", "moe.renormalize": True},
    "dots1": {"model.qkv_bias": True, "model.o_bias": True, "model.qk_norm": "per_head", "model.sliding_window": 8,
              "model.attention_layers": ["full", "sliding"], "model.pattern": ["dense", "moe"], "moe.n_group": 2,
              "moe.score_func": "sigmoid", "moe.bias_balancing": True, "moe.routed_scaling_factor": 1.8,
              "moe.num_shared_experts": 1, "moe.renormalize": True},
    "dots1_plain": {"model.qkv_bias": False, "model.o_bias": False, "model.sliding_window": 0,
                    "model.pattern": ["moe", "moe"], "moe.n_group": 1, "moe.num_shared_experts": 2,
                    "moe.renormalize": False, "model.tie_embeddings": True},
    "minimax_m2": {"model.qk_norm": "full", "model.rotary_fraction": 0.5, "model.head_dim": 32, "moe.renormalize": True,
                   "moe.score_func": "sigmoid", "moe.bias_balancing": True, "moe.num_shared_experts": 0,
                   "model.pattern": ["moe", "moe"]},
    "minimax_m2_whole": {"model.rotary_fraction": 1.0, "model.head_dim": 24, "moe.top_k": 3, "model.n_kv_heads": 4,
                         "model.rope.scaling": "yarn", "model.tie_embeddings": True},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_config_carries_the_family_options_and_flops_counts_them(family):
    from sparselm.config import load_config
    from sparselm.convert.hf_import_config import sparselm_config
    from sparselm.model import build_model
    from sparselm.planning.flops import flop_counts, param_counts

    hf = json.loads(family_config(family).to_json_string())
    cfg = load_config(None, {**sparselm_config(hf), "data": {"seq_len": 32}})
    for key, value in CARRIED[family].items():
        assert functools.reduce(getattr, key.split("."), cfg) == value, key
    model = build_model(cfg, device="meta")
    counts = param_counts(cfg)
    assert counts.total == model.num_params() and counts.active == model.num_params(active=True)
    assert flop_counts(cfg).per_token > 0


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "dots1", "minimax_m2"]
EXPORT_CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in MOE_FAMILIES]


@pytest.mark.parametrize("family, fused", EXPORT_CASES)
def test_export_loads_in_transformers_with_the_same_logits_and_generation(tmp_path, family, fused):
    """transformers model -> import-hf -> export-hf (per-expert names, or fused) -> transformers: the same family
    chosen, no missing or unexpected key, logits within 1e-5 of sparselm's, greedy 20 tokens identical."""
    from sparselm import load_model
    from sparselm.generate import generate

    save_hf(tiny_hf_model(family), tmp_path / "hf", fused=fused)  # the import reads either naming too
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    args = ["export-hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "out"), "--max-shard-gb",
            str(150_000 / 2**30)] + (["--fused-experts"] if fused else [])
    convert(args)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family_config(family).model_type
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    keys = set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"])
    if family_config(family).model_type in MOE_FAMILIES:
        per_expert = any(".experts.0." in k for k in keys)
        assert per_expert != fused and any(k.endswith("experts.gate_up_proj") for k in keys) == fused
    if family == "gpt_oss":  # one layout, as transformers writes it: fused, with biases
        assert {"model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.1.self_attn.sinks"} <= keys
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True,
                                                                 output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours, _ = load_model(tmp_path / "ours")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    diff = max_diff(hf, ours, ids)
    print(f"{family}{' fused' if fused else ''}: export max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    prompt = ids[:1, :5]
    mine = generate(ours, prompt, 20, temperature=0, eod_id=config["eos_token_id"])[0].tolist()
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0].tolist()
    assert theirs == mine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_import_keeps_half_precision_weights(tmp_path, dtype):
    from sparselm import load_model

    hf = tiny_hf_model("qwen3_moe").to(dtype)
    save_hf(hf, tmp_path / "hf")
    info = convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) and \
        convert(["inspect", "--input", str(tmp_path / "ours"), "--json"])
    assert {t["dtype"] for t in info["tensors"].values()} == {str(dtype).replace("torch.", "")}
    ours, _ = load_model(tmp_path / "ours")  # fp32 copies of the stored values
    # transformers' model of the same stored values in fp32 (rebuilt: a cast model keeps rotary tables in half)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    assert max_diff(ref, ours, ids) < 1e-5


def _add_tensors(hf_dir, tensors: dict):
    """Add tensors in a new shard listed by the index (as an unexpected or quantized checkpoint would)."""
    from safetensors.torch import save_file

    save_file(tensors, str(hf_dir / "extra.safetensors"))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "extra.safetensors"))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def _drop_tensors(hf_dir, names: set):
    """Remove ``names`` from a sharded save_pretrained directory (shards and index)."""
    from safetensors.torch import load_file, save_file

    index_file = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in {index["weight_map"][n] for n in names}:
        kept = {k: v for k, v in load_file(str(hf_dir / shard)).items() if k not in names}
        save_file(kept, str(hf_dir / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in names}
    index_file.write_text(json.dumps(index))


def test_import_dequantizes_mxfp4_experts_as_transformers_does(tmp_path):
    """gpt-oss with its routed experts stored as MXFP4 blocks and scales (quantization_config mxfp4), the
    transformers model holding transformers' own dequantization of them: logits within 1e-5, experts stored bf16."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from sparselm import load_model

    hf = tiny_hf_model("gpt_oss")
    g, packed = torch.Generator().manual_seed(6), {}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(layer.mlp.experts, proj)  # [E, in, out]
                e, d_in, d_out = w.shape
                blocks = torch.randint(0, 256, (e, d_out, d_in // 32, 16), generator=g, dtype=torch.uint8)
                scales = torch.randint(118, 124, (e, d_out, d_in // 32), generator=g, dtype=torch.uint8)
                w.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).float())
                packed.update({f"model.layers.{i}.mlp.experts.{proj}_blocks": blocks,
                               f"model.layers.{i}.mlp.experts.{proj}_scales": scales})
    hf_dir = save_hf(hf, tmp_path / "hf")
    _drop_tensors(hf_dir, {k.rsplit("_", 1)[0] for k in packed})
    _add_tensors(hf_dir, packed)
    _edit(hf_dir, quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router"]})
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    info = convert(["inspect", "--input", str(tmp_path / "ours"), "--json"])
    assert info["tensors"]["layers.1.ffn.experts.gate_up_proj"]["dtype"] == "bfloat16"
    ours, _ = load_model(tmp_path / "ours")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    diff = max_diff(hf, ours, ids)
    print(f"gpt_oss mxfp4: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


def _break_missing_shard(hf_dir):
    sorted(hf_dir.glob("model-*.safetensors"))[1].unlink()


def _break_truncated_shard(hf_dir):
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])


REFUSALS = {
    "missing shard": (_break_missing_shard, "shard '.*model-00002-of-.*' named by model.safetensors.index.json is missing"),
    "truncated shard": (_break_truncated_shard, "shard '.*model-00002-of-.*' is truncated"),
    "expert biases": (lambda d: _add_tensors(d, {"model.layers.0.mlp.experts.0.gate_proj.bias": torch.zeros(32)}),
                      "has tensors sparselm has no place for .*model.layers.0.mlp.experts.0.gate_proj.bias"),
    "quantized": (lambda d: _add_tensors(d, {"model.layers.0.mlp.experts.0.qweight": torch.zeros(4, dtype=torch.int8)}),
                  "model.layers.0.mlp.experts.0.qweight has dtype I8 .quantized weights.; supported: bf16, fp16, fp32"),
    "activation": (lambda d: _edit(d, hidden_act="gelu"), "hidden_act='gelu' .supported: silu"),
    "family": (lambda d: _edit(d, model_type="hunyuan_v1_moe"),
               "model_type='hunyuan_v1_moe' is not supported; import-hf reads llama, "),
}


def _edit(hf_dir, **values):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(values)
    (hf_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def saved_qwen2_moe(tmp_path_factory):
    return save_hf(tiny_hf_model("qwen2_moe"), tmp_path_factory.mktemp("qwen2_moe") / "hf")


@pytest.mark.parametrize("case", list(REFUSALS))
def test_import_refuses_bad_input_in_one_line_before_writing(tmp_path, saved_qwen2_moe, case):
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(saved_qwen2_moe, hf_dir)
    breaker, message = REFUSALS[case]
    breaker(hf_dir)
    with pytest.raises(ConversionError, match=message) as err:
        convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("family, edit, message", [
    ("minimax_m2", {"rope_parameters": None, "rope_theta": 10000.0, "rotary_dim": 5},  # transformers rotates 6
     "minimax_m2 model cannot be imported without changing what it computes: rotary_dim=5 .supported: an even number"),
    ("dots1", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "dots1 model cannot be imported .*rope_parameters.rope_type='dynamic' .supported: default, linear"),
])
def test_import_refuses_a_family_option_sparselm_does_not_compute_in_one_line(tmp_path, family, edit, message):
    hf_dir = save_hf(tiny_hf_model(family), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(edit)
    (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ConversionError, match=message) as err:
        convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ours").exists()


def test_minimax_m2_layers_after_the_decoder_layers_are_left_out_in_one_line(tmp_path, capsys):
    """MiniMax-M2's config.json names multi-token-prediction modules (num_mtp_modules) transformers' MiniMaxM2 does
    not build; tensors of layers after the decoder layers are left out, said in one line, and the logits are
    transformers' (which drops them too)."""
    from sparselm import load_model

    hf = tiny_hf_model("minimax_m2")
    hf_dir = save_hf(hf, tmp_path / "hf")
    _add_tensors(hf_dir, {"model.layers.2.self_attn.q_proj.weight": torch.zeros(128, 64),
                          "model.layers.2.block_sparse_moe.gate.weight": torch.zeros(4, 64)})
    _edit(hf_dir, use_mtp=True, num_mtp_modules=1)
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    assert "left out 2 tensors of the layers after the 2 decoder layers" in capsys.readouterr().out
    ours, _ = load_model(tmp_path / "ours")
    assert max_diff(hf, ours, torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(8))) < 1e-5


def test_import_overwrites_an_existing_output_only_with_force(tmp_path, saved_qwen2_moe):
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "keep.txt").write_text("precious")
    args = ["import-hf", "--input", str(saved_qwen2_moe), "--output", str(tmp_path / "ours")]
    with pytest.raises(ConversionError, match="not empty"):
        convert(args)
    assert (tmp_path / "ours" / "keep.txt").read_text() == "precious"
    convert(args + ["--force"])
    assert not (tmp_path / "ours" / "keep.txt").exists() and (tmp_path / "ours" / "meta.json").is_file()


@pytest.mark.parametrize("family", ["glm4_moe", "gpt_oss", "ernie4_5_moe"])
def test_round_trip_import_train_tp2_ep2_export(tmp_path, family):
    """GLM-4-MoE (group-limited sigmoid routing with its selection bias, shared experts, per-head q/k norm,
    partial rotary, a dense first layer), gpt-oss (sinks split with the heads, biases, experts cut by width
    with their biases, the clamp) and ERNIE-4.5-MoE (interleaved rope pairs split with the heads, its [1, E]
    selection bias, dense layers between the MoE ones) imported, trained 2 steps under tp2 x ep2, exported:
    transformers' logits equal those of sparselm's consolidated trained model within 1e-5."""
    from sparselm import load_model
    from support.distributed import run_distributed

    save_hf(tiny_hf_model(family), tmp_path / "hf")
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    run_distributed(train_imported, 4, tmp_path / "ours", str(tmp_path / "run"))
    trained, _ = load_model(tmp_path / "run")
    imported, _ = load_model(tmp_path / "ours")
    convert(["export-hf", "--input", str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (imported(ids) - trained(ids)).abs().max().item() > 1e-3  # the steps changed the model
    diff = max_diff(hf, trained, ids)
    print(f"round trip ({family}, tp2 x ep2): export max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 1.3,
     "partial_rotary_factor": 0.5},
])
def test_rope_frequencies_equal_transformers(rope):
    """Inverse frequencies and the attention factor, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sparselm.config import load_config
    from sparselm.convert.hf_import_config import sparselm_config
    from sparselm.model.rotary import rope_frequencies

    hf_cfg = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, num_hidden_layers=1, vocab_size=300,
                                      max_position_embeddings=131072, rope_parameters={"rope_theta": 500000.0, **rope})
    theirs, their_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    cfg = load_config(None, {**sparselm_config(json.loads(hf_cfg.to_json_string())), "data": {"seq_len": 32}})
    ours, our_scale = rope_frequencies(cfg.model)
    assert torch.equal(ours, theirs.float())
    assert our_scale == pytest.approx(their_scale, rel=1e-12)


@pytest.mark.parametrize("rope, top_level", [
    ({"rope_type": "yarn", "factor": 4.0}, {}),  # no original length: transformers takes max_position_embeddings
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
     {"original_max_position_embeddings": 4096}),  # the top-level field wins (Phi-3 style)
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, {"original_max_position_embeddings": 2048}),
])
def test_rope_original_length_is_found_where_transformers_finds_it(rope, top_level):
    """A config.json as written (not re-serialised by transformers, which fills the rotary dict in)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sparselm.config import load_config
    from sparselm.convert.hf_import_config import sparselm_config
    from sparselm.model.rotary import rope_frequencies

    raw = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 1,
           "intermediate_size": 512, "vocab_size": 300, "max_position_embeddings": 32768, "hidden_act": "silu",
           "rope_parameters": {"rope_theta": 500000.0, **rope}, **top_level}
    hf_cfg = transformers.LlamaConfig.from_dict(json.loads(json.dumps(raw)))
    theirs, their_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    cfg = load_config(None, {**sparselm_config(raw), "data": {"seq_len": 32}})
    ours, our_scale = rope_frequencies(cfg.model)
    assert torch.equal(ours, theirs.float())
    assert our_scale == pytest.approx(their_scale, rel=1e-12)


@pytest.mark.parametrize("family, edit", [
    ("qwen2", {"layer_types": None}),  # config.json older than layer_types: derived from max_window_layers
    ("qwen2_moe", {"layer_types": None, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    ("qwen3_moe", {"sliding_window": 8, "use_sliding_window": False}),  # a window transformers ignores
    ("qwen3_moe", {"sliding_window": 8, "use_sliding_window": True}),
    ("dots1", {"layer_types": None, "use_sliding_window": False}),  # dots1 has no switch: the window stays
    ("dots1", {"layer_types": None, "sliding_window": None, "max_window_layers": 1}),  # its default window, 4096
    ("dots1_plain", {"layer_types": None, "sliding_window": 8, "max_window_layers": None}),  # default 62: none slides
    ("minimax_m2", {"rope_parameters": None, "rope_theta": 10000.0, "rotary_dim": 8}),  # only the legacy rotary_dim
    ("minimax_m2", {"rotary_dim": 8}),  # rope_parameters' partial_rotary_factor (0.5) wins over rotary_dim
])
def test_import_reads_a_published_config_json_as_transformers_does(tmp_path, family, edit):
    """The windows and rotary width transformers makes of a config.json as published (keys absent, legacy
    spellings; None removes a key), compared with transformers loading it, and exported back so that
    transformers makes the same of them."""
    from sparselm import load_model

    save_hf(tiny_hf_model(family), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update({k: v for k, v in edit.items() if v is not None})
    config = {k: v for k, v in config.items() if not (k in edit and edit[k] is None)}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    windows = [cfg.model.layer_window(i) for i in range(cfg.model.n_layers)]
    assert windows == [hf.config.sliding_window or 0 if t == "sliding_attention" or family == "qwen3_moe" else 0
                       for t in getattr(hf.config, "layer_types", None) or ["full_attention"] * cfg.model.n_layers]
    rotated = hf.model.rotary_emb.inv_freq.numel() * 2
    assert int(cfg.model.head_width * cfg.model.rotary_fraction) == rotated
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    assert max_diff(hf, ours, ids) < 1e-5
    convert(["export-hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "out")])
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    assert max_diff(back, ours, ids) < 1e-5


@pytest.mark.parametrize("family, raw", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}),  # max_window_layers absent: 28
    ("dots1", {"sliding_window": 8}),  # max_window_layers absent: 62
    ("dots1", {"max_window_layers": 1}),  # sliding_window absent: 4096
])
def test_windows_of_a_config_json_without_layer_types_follow_the_family_defaults(family, raw):
    """A config.json of 64 layers lacking layer_types (and max_window_layers or sliding_window): the sliding layers
    and window transformers' config class derives, read off the config alone."""
    from sparselm.config import load_config
    from sparselm.convert.hf_import_config import sparselm_config

    raw = {"model_type": family, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 64,
           "intermediate_size": 96, "vocab_size": VOCAB, "moe_intermediate_size": 32, "n_routed_experts": 4,
           "n_shared_experts": 1, "num_experts_per_tok": 2, **raw}
    theirs = transformers.AutoConfig.for_model(**raw)
    cfg = load_config(None, {**sparselm_config(raw), "data": {"seq_len": 32}})
    assert [cfg.model.layer_window(i) for i in range(64)] == [
        theirs.sliding_window if t == "sliding_attention" else 0 for t in theirs.layer_types]
    assert 0 < sum(t == "sliding_attention" for t in theirs.layer_types) < 64


def record_keys(fam) -> list[str]:
    """The config.json keys a family's record names (the ones its import reads and its export writes)."""
    keys = [fam.qkv_bias_key, fam.qk_norm_key, "clip_qkv" if fam.clip_qkv else None]
    keys += {"all": ["sliding_window"], "per_layer": ["sliding_window", "layer_types"]}.get(fam.window, [])
    keys += ["use_sliding_window"] if fam.window_switch else []
    keys += ["rotary_dim"] if fam.legacy_rotary_dim else []
    if fam.moe:
        keys += [fam.experts_key, fam.expert_hidden_key, fam.renormalize_key, fam.top_k_key, fam.renormalize_min_key]
        keys += [fam.shared_experts.key] if fam.shared_experts else []
        keys += ["n_group", "topk_group", "routed_scaling_factor"] if fam.group_routing else []
        placement = {"listed": ["mlp_only_layers"], "first": ["first_k_dense_replace"],
                     "interval": ["moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"]}
        keys += placement.get(fam.dense_layers, [])
    keys += [fam.bias_key]
    return [k for k in keys if k]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe",
                                  "glm4_moe", "gpt_oss", "dots1", "minimax_m2", "ernie4_5_moe"])
def test_each_family_record_round_trips_its_config(name):
    """transformers' config of the family -> import's mapping -> export's writer: the family is chosen again,
    every key its record names comes back with transformers' value, and importing the written config gives
    the same sparselm config."""
    from sparselm.config import load_config
    from sparselm.convert.hf_export_config import choose_family, hf_config
    from sparselm.convert.hf_families import BY_NAME, FAMILIES
    from sparselm.convert.hf_import_config import sparselm_config

    assert [f.name for f in FAMILIES] == list(BY_NAME) and name in BY_NAME
    fam = BY_NAME[name]
    hf_cfg = family_config(name)
    theirs = json.loads(hf_cfg.to_json_string(use_diff=False))
    cfg = load_config(None, {**sparselm_config(theirs), "data": {"seq_len": 32}})
    assert choose_family(cfg) is fam
    ours = hf_config(fam, cfg, eod_id=0)
    assert ours["model_type"] == name and ours["architectures"] == [fam.architecture]
    for key in record_keys(fam):
        assert key in ours, key
        if key == "sliding_window" and not theirs.get("use_sliding_window", True):
            continue  # a window transformers ignores is not carried
        stored = hf_cfg.attribute_map.get(key, key)  # e.g. Qwen3-MoE stores num_experts as num_local_experts
        assert ours[key] == theirs[stored], (key, ours[key], theirs[stored])
    again = load_config(None, {**sparselm_config(ours), "data": {"seq_len": 32}})
    assert again.model.head_width == cfg.model.head_width  # export writes head_dim even where it was derived
    again.model.head_dim = cfg.model.head_dim
    assert again == cfg

