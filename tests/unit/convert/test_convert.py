"""Checkpoint conversion: consolidate, inspect, export to / import from the Hugging Face layouts."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sparselm.config import load_config
from sparselm.convert.store import write_model_checkpoint
from sparselm.errors import ConversionError
from sparselm.model import build_model
from tools.convert_checkpoint import main as convert

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")


def make_checkpoint(path, *overrides):
    cfg = load_config("tiny_dense", ["--model.vocab_size=128", "--model.d_model=64", "--model.n_layers=2",
                                     "--model.n_heads=4", "--model.n_kv_heads=2", *overrides])
    model = build_model(cfg, seed=7)
    write_model_checkpoint(path, {k: v for k, v in model.state_dict().items()
                                  if not (cfg.model.tie_embeddings and k == "head.proj.weight")}, cfg, source="test")
    return model, cfg


@pytest.mark.parametrize("tied", [False, True])
def test_export_llama_matches_transformers_logits(tmp_path, tied):
    model, cfg = make_checkpoint(tmp_path / "ckpt", f"--model.tie_embeddings={tied}")
    convert(["export-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        diff = (hf(ids).logits - model.eval()(ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_import_llama_round_trip(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=5000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    convert(["import-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    from sparselm import load_model

    ours, cfg = load_model(tmp_path / "ours")
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, diff
    assert cfg.model.n_kv_heads == 2 and cfg.model.rope.theta == 5000.0


def test_consolidate_and_inspect(tmp_path, capsys):
    model, cfg = make_checkpoint(tmp_path / "ckpt")
    # a shard limit below the model's size: several Hugging Face-style files, each written on its own
    convert(["consolidate", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "one"), "--dtype", "bf16",
             "--max-shard-gb", str(40_000 / 2**30)])
    files = sorted((tmp_path / "one" / "model").glob("model-*-of-*.safetensors"))
    assert len(files) > 2 and all(f.stat().st_size < 40_000 + 20_000 for f in files)
    index = json.loads((tmp_path / "one" / "model" / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    assert set(index["weight_map"]) == set(tensors)
    assert tensors["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["embed.weight"], model.state_dict()["embed.weight"].bfloat16())
    capsys.readouterr()
    info = convert(["inspect", "--input", str(tmp_path / "one"), "--json"])
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert json.loads(capsys.readouterr().out)["layer_kinds"] == ["dense", "dense"]


def test_format1_checkpoints_still_load(tmp_path):
    """A checkpoint of the first format (one model.safetensors written by rank 0) loads and converts."""
    from sparselm import load_model
    from sparselm.checkpoint.files import write_safetensors
    from sparselm.config import to_yaml

    cfg = load_config("tiny_dense", ["--model.vocab_size=128", "--model.d_model=64", "--model.n_layers=2"])
    model = build_model(cfg, seed=3)
    old = tmp_path / "step_5"
    old.mkdir()
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, old / "model.safetensors")
    write_safetensors({}, old / "optimizer.safetensors")
    (old / "config.yaml").write_text(to_yaml(cfg))
    (old / "meta.json").write_text(json.dumps({"format": "sparselm-checkpoint", "version": 1, "step": 5,
                                               "optimizer_step": 5, "sampler": None, "layout": None}))
    loaded, _ = load_model(old)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
    info = convert(["inspect", "--input", str(old), "--json"])
    assert info["format_version"] == 1 and info["parameters"] == sum(p.numel() for p in model.parameters())
    convert(["consolidate", "--input", str(old), "--output", str(tmp_path / "v2")])
    again, _ = load_model(tmp_path / "v2")
    with torch.no_grad():
        assert torch.equal(again(ids), loaded(ids))


def test_conversions_refuse_to_overwrite_and_bad_inputs(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="not empty"):
        convert(["consolidate", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    (tmp_path / "nohf").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(["import-hf", "--input", str(tmp_path / "nohf"), "--output", str(tmp_path / "x")])


MIXTRAL = ["--model.pattern=moe", "--moe.num_experts=4", "--moe.top_k=2", "--moe.num_shared_experts=0",
           "--moe.drop_tokens=false", "--moe.score_func=softmax", "--moe.renormalize=true", "--moe.expert_hidden=48"]


@pytest.mark.parametrize("expert_hidden", ["--moe.expert_hidden=48", "--moe.expert_hidden=0"])  # 0: derived
def test_export_mixtral_matches_transformers_logits(tmp_path, expert_hidden):
    model, cfg = make_checkpoint(tmp_path / "ckpt", *MIXTRAL, expert_hidden)
    convert(["export-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        diff = (hf(ids).logits - model.eval()(ids)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("pattern, message", [
    (["--model.pattern=dense,moe"] + MIXTRAL[1:], "dense layers among the MoE layers"),
    (MIXTRAL + ["--moe.drop_tokens=true"], "moe.drop_tokens=true"),
    (MIXTRAL + ["--moe.num_shared_experts=1"], "moe.num_shared_experts=1"),
    (MIXTRAL + ["--moe.num_shared_experts=1", "--moe.score_func=sigmoid", "--moe.bias_balancing=true",
                "--model.qk_norm=per_head", "--model.o_bias=true"],  # dots1 biases o only with q, k, v
     "the closest, dots1, cannot express: model.o_bias=true with model.qkv_bias=false .attention_bias biases q, k, v "
     "and o together.. Use"),
    (["--model.pattern=pkm", "--pkm.n_keys=256", "--pkm.k_dim=32", "--pkm.knn=8"], "no Hugging Face"),
    (["--model.pattern=allattn"], "no Hugging Face"),
])
def test_export_refuses_models_without_an_equivalent(tmp_path, pattern, message):
    make_checkpoint(tmp_path / "ckpt", *pattern)
    with pytest.raises(ConversionError, match=message):
        convert(["export-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_upcycled_model_computes_the_dense_function(tmp_path):
    from sparselm import load_model

    dense, cfg = make_checkpoint(tmp_path / "dense")
    convert(["upcycle", "--input", str(tmp_path / "dense"), "--output", str(tmp_path / "moe"), "--experts", "4",
             "--top-k", "2"])
    moe, moe_cfg = load_model(tmp_path / "moe")
    assert moe_cfg.model.layer_kinds() == ["moe", "moe"] and moe_cfg.moe.num_experts == 4
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        dense_out, moe_out = dense.eval()(ids[:, :-1], ids[:, 1:]), moe(ids[:, :-1], ids[:, 1:])
    assert moe_out.lm_loss.item() == pytest.approx(dense_out.lm_loss.item(), abs=1e-5)
    assert moe.num_params() > dense.num_params() * 1.5
    every_other = tmp_path / "moe2"
    convert(["upcycle", "--input", str(tmp_path / "dense"), "--output", str(every_other), "--experts", "4",
             "--every", "2"])
    assert load_model(every_other)[1].model.layer_kinds() == ["dense", "moe"]


# ---------------------------------------------------------------------------------------------
# import-hf refuses every setting that changes the function and that sparselm does not compute
def _positional_llama(tmp_path):
    """A tiny Llama whose q/k weights are scaled x20, so that rotary positions matter to its logits."""
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    hf.save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


def _edit_config(hf_dir, drop=(), **values):
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, named", [
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "factor": 4.0}}, "rope_scaling.rope_type='longrope'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope_parameters.rope_type='dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),  # was imported silently as silu
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config.quant_method='bitsandbytes'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"model_type": "deepseek_v3", "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
     "kv_lora_rank=None (supported: the latent widths of multi-head latent attention"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config.quant_method='mxfp4' (supported: unquantized"),
    ({"model_type": "phi3"}, "model_type='phi3' is not supported; import-hf reads llama, mistral"),
])
def test_import_refuses_settings_it_cannot_compute_naming_field_and_value(tmp_path, edit, named):
    hf_dir = _positional_llama(tmp_path)
    _edit_config(hf_dir, drop=["rope_parameters"] if "rope_scaling" in edit else (), **edit)
    with pytest.raises(ConversionError) as err:
        convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    assert named in str(err.value), str(err.value)
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("edit", [
    {"rope_theta": 2500.0, "rope_scaling": None},  # the transformers 4.x spelling of a default rotary
    {"rope_parameters": {"rope_type": "default", "rope_theta": 2500.0}},
    {"rope_parameters": {"type": "default", "rope_theta": 2500.0}},
])
def test_import_carries_supported_rope_spellings_and_the_logits_match(tmp_path, edit):
    from sparselm import load_model

    hf_dir = _positional_llama(tmp_path)
    _edit_config(hf_dir, drop=["rope_parameters"] if "rope_scaling" in edit else (), **edit)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).eval()
    convert(["import-hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    ours, cfg = load_model(tmp_path / "ours")
    assert cfg.model.rope.theta == 2500.0
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        theirs = hf(ids).logits
        assert (theirs - ours(ids)).abs().max().item() < 1e-4
        assert (theirs[:, 1:] - theirs[:, :-1]).abs().max().item() > 0.1  # positions do matter here


# ---------------------------------------------------------------------------------------------
# export-hf carries the token ids transformers would otherwise assume
def _stops_early(model, cfg, eod_id):
    """Make greedy decoding emit end-of-document after a few tokens: its output row copies, slightly larger,
    the row of a token that greedy decoding picks a few steps in."""
    from sparselm.generate import generate

    prompt = torch.tensor([[5, 6, 7]])
    free = generate(model.eval(), prompt, 12, temperature=0)[0, 3:].tolist()
    target = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    with torch.no_grad():
        model.head.proj.weight[eod_id] = model.head.proj.weight[target] * 1.05
    return prompt


@pytest.mark.parametrize("layout", ["llama", "mixtral"])
def test_exported_model_stops_generating_where_sparselm_does(tmp_path, layout):
    from sparselm.generate import generate

    model, cfg = make_checkpoint(tmp_path / "ckpt0", "--model.vocab_size=320", *(MIXTRAL if layout == "mixtral" else []))
    eod = 256  # the byte tokenizer's end of document
    prompt = _stops_early(model, cfg, eod)
    write_model_checkpoint(tmp_path / "ckpt", dict(model.state_dict()), cfg, source="test")
    convert(["export-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == eod and config["bos_token_id"] is None
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == eod
    ours = generate(model.eval(), prompt, 20, temperature=0, eod_id=eod)[0].tolist()
    assert ours[-1] == eod and len(ours) < 23
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0].tolist()
    assert theirs == ours


def test_export_names_the_trained_tokenizers_end_of_document(tmp_path):
    from sparselm.data.tokenizer import train_bpe

    tok = train_bpe(["some text to learn merges from " * 20], 300, tmp_path / "tok" / "tokenizer.json")
    assert tok.eod_id != 256
    make_checkpoint(tmp_path / "ckpt", f"--data.tokenizer={tmp_path / 'tok' / 'tokenizer.json'}",
                    "--model.vocab_size=320")
    convert(["export-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == tok.eod_id


def test_resuming_a_model_only_checkpoint_says_what_restarts(tmp_path, capsys):
    """A consolidated or converted checkpoint holds weights only: a run resumed from it says at start-up that
    the data and Adam's moments start over."""
    from sparselm.train import main

    overrides = ["--model.vocab_size=384"]
    make_checkpoint(tmp_path / "ckpt", *overrides)
    convert(["consolidate", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "whole")])
    capsys.readouterr()
    main(["--config", "tiny_dense", "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4",
          "--model.n_kv_heads=2", *overrides, f"--train.resume={tmp_path / 'whole'}", "--train.steps=1",
          f"--train.out_dir={tmp_path / 'run'}", "--train.eval_every=0", "--train.progress=false",
          "--train.tensorboard=false"])
    out = capsys.readouterr().out
    assert "is a model-only checkpoint" in out
    assert "the data starts from its first sample and Adam's moments start from zero" in out
