"""DeepSeek-V3 (and Kimi K2's model_type) and DeepSeek-V2 through import-hf and export-hf, against transformers'
DeepseekV3 and DeepseekV2.

Tiny random models built offline.  Both values of every switch of the family that changes the computation
appear: a query latent or one q_proj, projection biases (attention_bias) or none, interleaved or half-split
rope, yarn with mscale_all_dim (softmax-scale fold) or default rope, renormalised or raw top-k weights, tied or
untied embeddings, per-expert or fused expert names; multi-token-prediction layers kept (or dropped by
--drop-mtp), and block-scaled fp8 weights with shapes that are no multiple of the block.  Logits within 1e-5
in fp32 both ways; greedy generation identical.  An imported model with its MTP layer trains under tp2 x ep2
and exports back with the trained model's logits and MTP layer.
"""
import json

import pytest
import torch

from sparselm.errors import ConversionError
from support.hf_models import assert_same_predictions, export_and_load, max_diff, move_from_init, save_hf
from tools.convert_checkpoint import main as convert

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")

VOCAB, SEQ = 288, 40
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.8,
              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, max_position_embeddings=128,
              rms_norm_eps=1e-6)
CONFIGS = {
    "latent_q_interleaved_yarn": dict(q_lora_rank=24, rope_interleave=True, norm_topk_prob=True, tie_word_embeddings=False,
                                      attention_bias=True,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 32, "mscale": 1.0,
                                                       "mscale_all_dim": 0.8}),
    "one_q_half_split_default": dict(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                                     tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 50000.0}),
}


V2 = {  # DeepSeek-V2: softmax scores, no renormalisation, groups by their best expert or none, complex-pair rope
    "v2_group_max_one_q": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                               attention_bias=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "v2_greedy_latent_q_yarn": dict(q_lora_rank=24, topk_method="greedy", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.707, "mscale_all_dim": 0.707}),
}


def tiny_hf_model(name: str, layers: int = 2, seed: int = 0):
    """A random DeepseekV3 (or, for a name of ``V2``, DeepseekV2) model whose weights are all far from their
    init (norms, selection bias included)."""
    torch.manual_seed(seed)
    if name in V2:
        v2 = {k: v for k, v in COMMON.items() if k not in ("n_group", "topk_group")}
        config = transformers.DeepseekV2Config(**{**v2, "num_hidden_layers": layers}, **V2[name])
    else:
        config = transformers.DeepseekV3Config(**{**COMMON, "num_hidden_layers": layers}, **CONFIGS[name])
    return move_from_init(transformers.AutoModelForCausalLM.from_config(config).eval())


def save(model, path, fused: bool = False, model_type: str | None = None):
    save_hf(model, path, fused)
    if model_type:
        edit_config(path, model_type=model_type)
    return path


def edit_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))


def add_tensors(hf_dir, tensors: dict):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(hf_dir / "extra.safetensors"))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "extra.safetensors"))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def ids_of(seed):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, fused, model_type", [("latent_q_interleaved_yarn", False, None),
                                                     ("one_q_half_split_default", True, "kimi_k2")])
def test_import_and_export_match_transformers(tmp_path, capsys, name, fused, model_type):
    """transformers -> import-hf -> sparselm: logits within 1e-5; -> export-hf -> transformers: the same
    family, no missing or unexpected key, logits within 1e-5, greedy 20 tokens identical."""
    from sparselm import load_model

    hf = tiny_hf_model(name)
    save(hf, tmp_path / "hf", fused=fused, model_type=model_type)
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    assert "holds none" in capsys.readouterr().out  # config says 1 MTP layer, save_pretrained writes none: said
    ours, cfg = load_model(tmp_path / "ours")
    assert cfg.model.attention == "mla" and cfg.model.rope_interleave == CONFIGS[name]["rope_interleave"]
    assert cfg.model.q_lora_rank == (CONFIGS[name]["q_lora_rank"] or 0) and cfg.model.mtp_layers == 0
    ids = ids_of(1)
    diff = max_diff(hf, ours, ids)
    print(f"deepseek_v3 {name}: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    back, config = export_and_load(tmp_path / "ours", tmp_path / "out", fused)
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 0
    assert_same_predictions(back, ours, ids, config["eos_token_id"], f"deepseek_v3 {name}: export")


@pytest.mark.parametrize("name, fused", [("v2_group_max_one_q", False), ("v2_greedy_latent_q_yarn", True)])
def test_deepseek_v2_imports_and_exports_with_the_same_logits(tmp_path, name, fused):
    from sparselm import load_model

    hf = tiny_hf_model(name)
    save(hf, tmp_path / "hf", fused=fused)
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    assert (cfg.moe.score_func, cfg.moe.renormalize, cfg.model.rope_interleave) == ("softmax", False, True)
    assert (cfg.moe.n_group, cfg.moe.group_score) == ((4, "max") if V2[name]["topk_method"] != "greedy" else (1, "max"))
    ids = ids_of(5)
    diff = max_diff(hf, ours, ids)
    print(f"deepseek_v2 {name}: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    back, config = export_and_load(tmp_path / "ours", tmp_path / "out", fused)
    assert config["model_type"] == "deepseek_v2" and config["topk_method"] == V2[name]["topk_method"]
    diff = max_diff(back, ours, ids)
    print(f"deepseek_v2 {name}: export max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


def test_glm4_moe_lite_imports_and_exports_with_the_same_logits(tmp_path, capsys):
    """GLM-4.x-Lite: DeepSeek-V3's attention and router, dense layers listed by mlp_layer_types (here a dense
    layer after an MoE one); its MTP layer, which its config.json does not name, is left out in one line."""
    from sparselm import load_model

    torch.manual_seed(0)
    v3 = {k: v for k, v in COMMON.items() if k != "first_k_dense_replace"}
    config = transformers.Glm4MoeLiteConfig(**{**v3, "num_hidden_layers": 3}, mlp_layer_types=["dense", "sparse", "dense"],
                                            **CONFIGS["latent_q_interleaved_yarn"])
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p)) if pname.endswith("norm.weight") else p.normal_(0, 0.08)
    save(hf, tmp_path / "hf")
    add_tensors(tmp_path / "hf", {"model.layers.3.eh_proj.weight": torch.zeros(64, 128)})
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    assert "left out 1 tensors of the layers after the 3 decoder layers" in capsys.readouterr().out
    ours, cfg = load_model(tmp_path / "ours")
    assert cfg.model.layer_kinds() == ["dense", "moe", "dense"]
    ids = ids_of(6)
    diff = max_diff(hf, ours, ids)
    print(f"glm4_moe_lite: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    convert(["export-hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "glm4_moe_lite"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    diff = max_diff(back, ours, ids)
    print(f"glm4_moe_lite: export max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


def hf_with_mtp_layer(path):
    """A DeepseekV3 checkpoint of 2 decoder layers carrying a multi-token-prediction layer as layer 2 (as the
    releases carry layer 61): its decoder layer is a third layer's, plus enorm, hnorm, eh_proj, shared_head."""
    three = tiny_hf_model("latent_q_interleaved_yarn", layers=3)
    save(three, path)
    g = torch.Generator().manual_seed(9)
    d = COMMON["hidden_size"]
    state = three.state_dict()
    add_tensors(path, {"model.layers.2.enorm.weight": 1 + 0.2 * torch.randn(d, generator=g),
                       "model.layers.2.hnorm.weight": 1 + 0.2 * torch.randn(d, generator=g),
                       "model.layers.2.eh_proj.weight": 0.08 * torch.randn(d, 2 * d, generator=g),
                       "model.layers.2.shared_head.norm.weight": 1 + 0.2 * torch.randn(d, generator=g),
                       "model.layers.2.embed_tokens.weight": state["model.embed_tokens.weight"],
                       "model.layers.2.shared_head.head.weight": state["lm_head.weight"]})
    edit_config(path, num_hidden_layers=2, num_nextn_predict_layers=1)
    return path


def tensors_of(directory) -> dict:
    """Every tensor of the sharded safetensors checkpoint in DIRECTORY, by name."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in index.items():
        with safe_open(str(directory / file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_multi_token_prediction_layers_are_kept_both_ways_or_dropped_by_name(tmp_path, capsys):
    from sparselm import load_model

    hf_dir = hf_with_mtp_layer(tmp_path / "hf")
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    assert cfg.model.mtp_layers == 1
    convert(["export-hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1

    source, written = tensors_of(hf_dir), tensors_of(tmp_path / "out")
    layer2 = {k for k in source if k.startswith("model.layers.2.")}
    assert layer2 and layer2 == {k for k in written if k.startswith("model.layers.2.")}
    assert all(torch.equal(source[k], written[k]) for k in source), "round trip changed a tensor"
    # transformers' model reads the decoder layers (the MTP layer is not part of it): same logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    assert max_diff(hf, ours, ids_of(3)) < 1e-5
    capsys.readouterr()
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "dropped"), "--drop-mtp"])
    assert "dropping the 1 multi-token-prediction layer" in capsys.readouterr().out
    assert load_model(tmp_path / "dropped")[1].model.mtp_layers == 0
    edit_config(hf_dir, num_nextn_predict_layers=2)  # names a second layer the checkpoint lacks
    with pytest.raises(ConversionError, match="holds multi-token-prediction layer.s. .2. of the 2"):
        convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "partial")])


def quantize_fp8(hf_dir, block: int, reference_dir):
    """Every 2-D weight of the decoder layers (not norms, router, embedding, head) as fp8 e4m3 with a
    power-of-two scale per block (so its dequantized value is exact in bf16 and fp32); ``reference_dir``: a
    copy of the checkpoint holding the dequantized values instead.  Returns those values by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, reference_dir)
    index_file = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    values = {}
    for file in sorted(set(index["weight_map"].values())):
        state = load_file(str(hf_dir / file))
        out = {}
        for name, w in state.items():
            quantize = (w.dim() == 2 and name.startswith("model.layers.") and not name.endswith("gate.weight"))
            if not quantize:
                out[name] = w
                continue
            rows, cols = w.shape
            nr, nc = -(-rows // block), -(-cols // block)
            padded = torch.zeros(nr * block, nc * block)
            padded[:rows, :cols] = w.float()
            amax = padded.view(nr, block, nc, block).abs().amax(dim=(1, 3)).clamp_min(1e-12)
            scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
            full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
            q = (w.float() / full).to(torch.float8_e4m3fn)
            out[name], out[name + "_scale_inv"] = q, scale
            values[name] = q.float() * full
            index["weight_map"][name + "_scale_inv"] = file
        save_file(out, str(hf_dir / file), metadata={"format": "pt"})
        save_file({**state, **{k: values[k] for k in state if k in values}}, str(reference_dir / file),
                  metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    edit_config(hf_dir, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [block, block]})
    return values


def test_block_fp8_weights_are_dequantized_while_streaming(tmp_path):
    """fp8 e4m3 weights with weight_scale_inv in 16 x 16 blocks (every shape here has a partial last block):
    imported as bf16, equal to transformers' model holding the dequantized values."""
    from sparselm import load_model

    save(tiny_hf_model("latent_q_interleaved_yarn"), tmp_path / "hf")
    values = quantize_fp8(tmp_path / "hf", block=16, reference_dir=tmp_path / "dequantized")
    assert any(v.shape[0] % 16 or v.shape[1] % 16 for v in values.values())
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    info = convert(["inspect", "--input", str(tmp_path / "ours"), "--json"])
    assert info["tensors"]["layers.0.attn.kv_b_proj.weight"]["dtype"] == "bfloat16"
    ours, _ = load_model(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dequantized"), local_files_only=True).eval()
    diff = max_diff(hf, ours, ids_of(4))
    print(f"deepseek_v3 fp8 (16 x 16 blocks): import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


def test_what_sparselm_cannot_compute_is_refused_in_one_line(tmp_path):
    save(tiny_hf_model("one_q_half_split_default"), tmp_path / "hf")
    edit_config(tmp_path / "hf", hidden_act="gelu")
    with pytest.raises(ConversionError, match=r"hidden_act='gelu' \(supported: silu") as err:
        convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    assert "\n" not in str(err.value) and not (tmp_path / "ours").exists()


def test_round_trip_import_train_tp2_ep2_export_keeps_the_mtp_layer(tmp_path):
    """DeepSeek-V3 (a query latent, interleaved rope with yarn's softmax-scale fold, group-limited sigmoid routing
    with its selection bias, a shared expert, a dense first layer) with its multi-token-prediction layer,
    imported, trained 2 steps under tp2 x ep2 (the MTP depth trains with it), exported: transformers' logits
    equal those of sparselm's consolidated trained model within 1e-5, and the MTP layer written back is the
    trained one (export -> import gives every trained tensor bit for bit)."""
    from sparselm import load_model
    from sparselm.training.metrics import read_metrics
    from support.distributed import run_distributed
    from support.hf_models import train_imported

    hf_dir = hf_with_mtp_layer(tmp_path / "hf")
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    run_distributed(train_imported, 4, tmp_path / "ours", str(tmp_path / "run"))
    rows = read_metrics(tmp_path / "run", train_only=True)
    assert len(rows) == 2 and all(r["mtp1_loss"] > 0 for r in rows)
    trained, cfg = load_model(tmp_path / "run")
    imported, _ = load_model(tmp_path / "ours")
    assert cfg.model.mtp_layers == 1 and cfg.model.q_lora_rank == 24 and cfg.moe.n_group == 2
    ids = ids_of(7)
    with torch.no_grad():
        assert (imported(ids) - trained(ids)).abs().max().item() > 1e-3  # the steps changed the model
    before, after = imported.state_dict(), trained.state_dict()
    mtp = [k for k in after if k.startswith("mtp.")]
    assert "mtp.0.eh_proj.weight" in mtp and not [k for k in mtp if torch.equal(before[k], after[k])]
    convert(["export-hf", "--input", str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    written = tensors_of(tmp_path / "out")
    assert torch.equal(written["model.layers.2.eh_proj.weight"], after["mtp.0.eh_proj.weight"])
    assert torch.equal(written["model.layers.2.embed_tokens.weight"], after["embed.weight"])  # the trained copies
    assert torch.equal(written["model.layers.2.shared_head.head.weight"], after["head.proj.weight"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    diff = max_diff(hf, trained, ids)
    print(f"round trip (deepseek_v3 with MTP, tp2 x ep2): export max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    convert(["import-hf", "--input", str(tmp_path / "out"), "--output", str(tmp_path / "back")])
    back = load_model(tmp_path / "back")[0].state_dict()
    assert back.keys() == after.keys()
    changed = [k for k in after if not torch.equal(back[k], after[k])]
    assert not changed, changed
