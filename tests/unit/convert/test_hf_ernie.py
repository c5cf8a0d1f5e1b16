"""ERNIE-4.5-MoE through import-hf and export-hf, against transformers' Ernie4_5_MoeForCausalLM.

Tiny random models built offline.  Both values of every switch of the family that changes the computation
appear: ungated shared experts or none, tied or untied embeddings, MoE layers placed with interval 1 and an
end before the last layer (a dense layer after the MoE ones) or interval 2 up to the last layer (end -1),
default rope or yarn, head_dim derived or set, per-expert or fused expert names; its interleaved rope pairs
and the [1, E] ``moe_statics`` selection bias are always on (the test shows each matters).  ``use_bias`` true,
a renormalisation floor above 1e-12 and a scaled partial rope are refused; ``model.mtp_*`` tensors are refused
unless --drop-mtp, which says it left them out.  Logits within 1e-5 in fp32 both ways; greedy generation
identical.
"""
import json

import pytest
import torch

from sparselm.errors import ConversionError
from support.hf_models import assert_same_predictions, export_and_load, max_diff, move_from_init, save_hf
from tools.convert_checkpoint import main as convert

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")

VOCAB, SEQ = 288, 40
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, moe_intermediate_size=32, moe_num_experts=4, moe_k=2, max_position_embeddings=128,
              rms_norm_eps=1e-6)
CONFIGS = {
    # [dense, moe, moe, dense]; two shared experts; rope_theta 500000 (the family default); untied
    "shared_untied_end2": dict(moe_num_shared_experts=2, tie_word_embeddings=False, moe_layer_start_index=1,
                               moe_layer_end_index=2, moe_layer_interval=1),
    # [dense, moe, dense, moe]; no shared expert; yarn; head_dim 24 (not hidden / heads); tied
    "unshared_tied_interval2_yarn": dict(moe_num_shared_experts=0, tie_word_embeddings=True, moe_layer_start_index=0,
                                         moe_layer_end_index=-1, moe_layer_interval=2, head_dim=24, rope_parameters={
                                             "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 32}),
}


def tiny_hf_model(name: str, seed: int = 0):
    """A random Ernie4_5_MoeForCausalLM whose weights (norms, router, selection bias included) are all far from
    their init."""
    torch.manual_seed(seed)
    config = transformers.Ernie4_5_MoeConfig(**COMMON, **CONFIGS[name])
    return move_from_init(transformers.AutoModelForCausalLM.from_config(config).eval())


def ids_of(seed):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def edit_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name, fused", [("shared_untied_end2", False), ("unshared_tied_interval2_yarn", True)])
def test_import_and_export_match_transformers(tmp_path, name, fused):
    """transformers -> import-hf -> sparselm: the family's options carried, logits within 1e-5 (and not without
    the interleaved rope or the selection bias); -> export-hf -> transformers: the same family and MoE layers, no
    missing or unexpected key, logits within 1e-5, greedy 20 tokens identical."""
    from sparselm import load_model
    from sparselm.model.rotary import Rotary

    hf = tiny_hf_model(name)
    save_hf(hf, tmp_path / "hf", fused=fused)
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    moe_layers = ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in hf.model.layers]
    assert cfg.model.layer_kinds() == moe_layers and moe_layers.count("dense") == 2
    assert cfg.model.rope_interleave and (cfg.moe.score_func, cfg.moe.bias_balancing, cfg.moe.renormalize) == (
        "softmax", True, True)
    assert cfg.moe.num_shared_experts == CONFIGS[name]["moe_num_shared_experts"] and not cfg.moe.shared_expert_gate
    assert cfg.model.tie_embeddings == CONFIGS[name]["tie_word_embeddings"]
    assert cfg.model.head_width == hf.model.layers[0].self_attn.head_dim
    first_moe = moe_layers.index("moe")
    assert torch.equal(ours.layers[first_moe].ffn.router.expert_bias,
                       hf.model.layers[first_moe].mlp.gate.moe_statics.e_score_correction_bias[0])
    ids = ids_of(1)
    diff = max_diff(hf, ours, ids)
    print(f"ernie4_5_moe {name}: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    back, config = export_and_load(tmp_path / "ours", tmp_path / "out", fused)
    assert config["model_type"] == "ernie4_5_moe" and config["use_bias"] is False
    keys = set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"])
    assert any(k.endswith("experts.gate_up_proj") for k in keys) == fused
    assert any(".experts.0.gate_proj." in k for k in keys) != fused
    assert ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in back.model.layers] == moe_layers
    assert_same_predictions(back, ours, ids, config["eos_token_id"],
                            f"ernie4_5_moe {name}{' fused' if fused else ''}: export")
    # the interleaved pairs and the selection bias each change the logits (so the checks above can fail)
    with torch.no_grad():
        for rotary in (m for m in ours.modules() if isinstance(m, Rotary)):
            rotary.interleave = False
        assert max_diff(hf, ours, ids) > 1e-3
        for rotary in (m for m in ours.modules() if isinstance(m, Rotary)):
            rotary.interleave = True
        for layer in ours.layers:
            if getattr(layer.ffn, "router", None) is not None:
                layer.ffn.router.expert_bias.zero_()
        assert max_diff(hf, ours, ids) > 1e-3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = tiny_hf_model("shared_untied_end2")
    return hf, save_hf(hf, tmp_path_factory.mktemp("ernie") / "hf")


def test_multi_token_prediction_tensors_are_refused_or_dropped_by_name(tmp_path, saved, capsys):
    """ERNIE's checkpoints store an MTP layer as model.mtp_block.0.*, mtp_emb_norm.0, mtp_hidden_norm.0,
    mtp_linear_proj.0 (transformers ignores them): refused in one line naming --drop-mtp, nothing written; with
    --drop-mtp left out, said in one line, the decoder imported as transformers loads it."""
    import shutil

    from safetensors.torch import save_file

    from sparselm import load_model

    hf, source = saved
    hf_dir = tmp_path / "hf"
    shutil.copytree(source, hf_dir)
    d, g = COMMON["hidden_size"], torch.Generator().manual_seed(9)
    mtp = {"model.mtp_emb_norm.0.weight": torch.ones(d), "model.mtp_hidden_norm.0.weight": torch.ones(d),
           "model.mtp_linear_proj.0.weight": 0.08 * torch.randn(d, 2 * d, generator=g),
           "model.mtp_block.0.self_attn.q_proj.weight": 0.08 * torch.randn(d, d, generator=g)}
    save_file(mtp, str(hf_dir / "mtp.safetensors"))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    edit_config(hf_dir, num_nextn_predict_layers=1)
    with pytest.raises(ConversionError, match="holds 4 multi-token-prediction tensors .*--drop-mtp") as err:
        convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    assert "\n" not in str(err.value) and not (tmp_path / "ours").exists()
    capsys.readouterr()
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours"), "--drop-mtp"])
    assert "dropping the 4 multi-token-prediction tensors" in capsys.readouterr().out
    ours, cfg = load_model(tmp_path / "ours")
    assert cfg.model.mtp_layers == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).eval()
    diff = max_diff(loaded, ours, ids_of(2))
    print(f"ernie4_5_moe MTP tensors dropped: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


REFUSED = {  # config.json edit -> the one-line refusal
    "use_bias": ({"use_bias": True}, "use_bias=True .*false: it also biases the MLPs"),
    "moe_norm_min": ({"moe_norm_min": 1e-3}, "moe_norm_min=0.001 .*at most 1e-12"),
    "scaled partial rope": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                                 "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_sparselm_cannot_compute_is_refused_in_one_line(tmp_path, saved, case):
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(saved[1], hf_dir)
    edit, message = REFUSED[case]
    edit_config(hf_dir, **edit)
    with pytest.raises(ConversionError, match=message) as err:
        convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    assert "\n" not in str(err.value) and not (tmp_path / "ours").exists()


def test_default_rope_ignores_partial_rotary_factor_as_transformers_does():
    """ERNIE's default rope is head_dim wide whatever partial_rotary_factor says: imported as whole-head."""
    from sparselm.config import load_config
    from sparselm.convert.hf_import_config import sparselm_config

    hf = json.loads(transformers.Ernie4_5_MoeConfig(**COMMON, **CONFIGS["shared_untied_end2"]).to_json_string())
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.Ernie4_5_MoeConfig.from_dict(hf))
    cfg = load_config(None, {**sparselm_config(hf), "data": {"seq_len": 32}})
    assert cfg.model.rotary_fraction == 1.0
    assert 2 * theirs.model.rotary_emb.inv_freq.numel() == cfg.model.head_width


def test_a_config_json_leaving_out_keys_imports_with_ernies_defaults(tmp_path):
    """A config.json without the keys whose ERNIE default differs from import's Llama-style fallbacks (tied
    embeddings, rope_theta 500000, rms_norm_eps 1e-5, two shared experts, 4 key/value heads, MoE from layer 1
    to the last) imports as transformers builds it: logits within 1e-5."""
    from sparselm import load_model

    raw = dict(model_type="ernie4_5_moe", architectures=["Ernie4_5_MoeForCausalLM"], vocab_size=VOCAB, hidden_size=64,
               num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, moe_intermediate_size=32,
               moe_num_experts=4, moe_k=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Ernie4_5_MoeConfig.from_dict(raw))
    hf = move_from_init(hf.eval())
    assert hf.config.tie_word_embeddings and hf.model.layers[1].mlp.shared_experts is not None
    save_hf(hf, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    assert (cfg.model.tie_embeddings, cfg.model.rope.theta, cfg.model.norm_eps, cfg.moe.num_shared_experts,
            cfg.model.kv_heads, cfg.model.layer_kinds()) == (True, 500000.0, 1e-5, 2, 4, ["dense", "moe", "moe"])
    diff = max_diff(hf, ours, ids_of(3))
    print(f"ernie4_5_moe config.json defaults: import max|diff| {diff:.2e}")
    assert diff < 1e-5, diff


def test_moe_placement_fields_express_exactly_the_placements_ernie_can():
    """Every MoE/dense pattern of up to 6 layers: export finds start/end/interval fields reproducing it exactly
    when ERNIE's rule can (each such placement is found), and refuses the others in one line naming them."""
    import itertools

    from sparselm.config import load_config
    from sparselm.convert.hf_export_config import choose_family
    from sparselm.convert.hf_family import interval_fields, interval_placement

    for n in range(1, 7):
        expressible = {tuple(interval_placement(n, s, e, k)) for s in range(n) for e in range(-1, n)
                       for k in range(1, n + 1)} - {(False,) * n}
        for pattern in itertools.product([False, True], repeat=n):
            fields = interval_fields(list(pattern))
            assert (fields is not None) == (pattern in expressible), pattern
            if fields:
                assert interval_placement(n, *fields) == list(pattern)
    base = {"model": {"d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96, "vocab_size": 256,
                      "max_seq_len": 128, "rope_interleave": True, "pattern": ["moe", "dense", "moe", "moe"]},
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "bias_balancing": True},
            "data": {"seq_len": 32}}
    with pytest.raises(ConversionError, match=r"ernie4_5_moe, cannot express: MoE layers \[0, 2, 3\]") as err:
        choose_family(load_config(None, base))
    assert "\n" not in str(err.value)
