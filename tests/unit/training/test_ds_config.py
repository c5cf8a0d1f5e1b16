"""DeepSpeed JSON files users bring: sparselm owns batch, optimizer, schedule and clipping; the JSON the rest."""
import json

import pytest

from support.run import TINY, train

from sparselm.config import ConfigError, load_config
from sparselm.training.ds_config import resolve_ds_json

# The Hugging Face Trainer style: "auto" everywhere, optimizer and scheduler blocks.
HF_STYLE = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": "auto", "allgather_bucket_size": 2e8},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000, "wall_clock_breakdown": False,
}
# The DeepSpeed-examples style: concrete batch sizes and an Adam block.
EXAMPLES_STYLE = {
    "train_batch_size": 256, "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 1}, "communication_data_type": "fp32",
}


def _cfg(*overrides):
    return load_config("tiny_dense", ["--train.global_batch_size=16", "--model.d_model=64", *overrides])


def test_hf_style_autos_are_filled_and_its_blocks_replaced_by_ours():
    ds, notes = resolve_ds_json(HF_STYLE, _cfg(), dp_size=2, source="hf.json")
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"] == {"enabled": False, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["zero_optimization"]["allgather_bucket_size"] == 2e8 and ds["zero_optimization"]["overlap_comm"] is True
    text = "\n".join(notes)
    assert "'optimizer' block (AdamW, all \"auto\") is replaced by sparselm's AdamW (optim.lr=0.003" in text
    assert "optim.weight_decay=0.1" in text and "optim.warmup_steps=" in text
    assert "bf16.enabled=false" in text and "zero_optimization.reduce_bucket_size=4096" in text
    assert "auto" not in json.dumps(ds)


def test_examples_style_batch_and_optimizer_are_refused_naming_key_and_setting():
    with pytest.raises(ConfigError) as err:
        resolve_ds_json(EXAMPLES_STYLE, _cfg(), 1, "ex.json")
    assert "train_batch_size=256 differs from sparselm's 16 (train.global_batch_size)" in str(err.value)
    assert "--train.global_batch_size=256" in str(err.value)
    with pytest.raises(ConfigError) as err:  # batch sizes now agree: the optimizer block is next
        resolve_ds_json(EXAMPLES_STYLE, _cfg("--train.global_batch_size=256", "--train.micro_batch_size=4"), 1, "ex.json")
    message = str(err.value)
    assert "'optimizer.params' sets lr=0.00015, weight_decay=0.01" in message
    assert "--optim.lr=0.00015 --optim.weight_decay=0.01" in message and "\n" not in message


def test_agreeing_values_pass_and_unknown_keys_go_through_listed():
    raw = {"train_batch_size": 16, "gradient_clipping": 1.0, "communication_data_type": "fp32",
           "flops_profiler": {"enabled": False}}
    ds, notes = resolve_ds_json(raw, _cfg(), 1, "mine.json")
    assert ds["communication_data_type"] == "fp32" and ds["flops_profiler"] == {"enabled": False}
    assert "passed to DeepSpeed unchanged: communication_data_type, flops_profiler" in notes


@pytest.mark.parametrize("raw, needle", [
    ({"gradient_clipping": 0.5}, "--optim.grad_clip=0.5"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "'zero_optimization.sub_group_size' is \"auto\""),
    ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, "'optimizer.type'='Lamb'"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 100}}}, "--optim.warmup_steps=100"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.99]}}}, "--optim.beta1=0.8 --optim.beta2=0.99"),
])
def test_what_sparselm_cannot_honour_is_refused_in_one_line(raw, needle):
    with pytest.raises(ConfigError) as err:
        resolve_ds_json(raw, _cfg(), 1, "mine.json")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_user_json_files_train_or_stop_before_any_work(tmp_path):
    hf = tmp_path / "hf_ds.json"
    hf.write_text(json.dumps(HF_STYLE))
    proc = train(TINY + ["--train.steps=1", f"--parallel.ds_config={hf}", f"--train.out_dir={tmp_path / 'hf'}"])
    assert "sparselm: ds_config: the JSON's 'optimizer' block" in proc.stdout
    saved = json.loads((tmp_path / "hf" / "ds_config.json").read_text())  # the resolved JSON DeepSpeed ran with
    assert saved["train_batch_size"] == 8 and "optimizer" not in saved and saved["zero_optimization"]["stage"] == 2
    ex = tmp_path / "ex_ds.json"
    ex.write_text(json.dumps(EXAMPLES_STYLE))
    proc = train(TINY + ["--train.steps=1", f"--parallel.ds_config={ex}", f"--train.out_dir={tmp_path / 'ex'}"],
                 check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        line for line in proc.stderr.splitlines() if line.startswith("sparselm: error: parallel.ds_config")]
    assert not (tmp_path / "ex").exists()
