from dataclasses import fields, is_dataclass

import pytest

from sparselm.config import Config, ConfigError, field_docs, load_config, parse_overrides, to_yaml


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny_dense", ["--train.steps=20", "--optim.lr", "1e-4", "--model.pattern=dense,dense",
                                     "--train.progress=false"])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.pattern == ["dense", "dense"]
    assert cfg.train.progress is False


def test_yaml_round_trip(tmp_path):
    cfg = load_config("tiny_dense", ["--train.steps=7"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(str(path))
    assert to_yaml(again) == to_yaml(cfg)


@pytest.mark.parametrize("override, words", [
    (["--train.stepz=3"], ["train.stepz", "train.steps"]),
    (["--nosection=3"], ["section"]),
    (["--train.steps=abc"], ["train.steps", "int"]),
    (["--train.steps=0"], ["train.steps", "positive"]),
    (["--model.n_heads=3"], ["model.d_model", "model.n_heads"]),
    (["--model.pattern=dense,nosuchkind"], ["nosuchkind", "known kinds"]),
    (["--data.seq_len=4096"], ["data.seq_len", "model.max_seq_len"]),
    (["--parallel.tp=3"], ["parallel.tp"]),
    (["--train.steps"], ["has no value"]),
])
def test_bad_settings_name_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_dense", override)
    for w in words:
        assert w in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no preset named 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar))


def test_every_config_field_has_a_docstring():
    cfg = Config()
    assert field_docs(type(cfg)).keys() >= {f.name for f in fields(cfg)}
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        assert is_dataclass(value)
        docs = field_docs(type(value))
        undocumented = [f.name for f in fields(value) if not docs.get(f.name)]
        assert not undocumented, f"{section.name}: fields without a docstring: {undocumented}"


def test_parse_overrides_rejects_positional():
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["stray"])


def test_rope_settings_are_a_section_and_the_old_flat_keys_still_load():
    from sparselm.config import RENAMED, describe, load_config

    cfg = load_config("tiny_dense", ["--model.rope.theta=500000", "--model.rope.scaling=linear", "--model.rope.factor=2"])
    assert (cfg.model.rope.theta, cfg.model.rope.scaling, cfg.model.rope.factor) == (500000.0, "linear", 2.0)
    # a config.yaml written before the section existed (older checkpoints) sets the same fields
    old = load_config("tiny_dense", {"model": {"rope_theta": 500000, "rope_scaling": "linear", "rope_factor": 2}})
    assert old.model.rope == cfg.model.rope
    assert RENAMED["model.rope_original_max_seq_len"] == "model.rope.original_max_seq_len"
    text = describe()
    assert "model.rope.theta = 10000.0" in text and "model.rope.truncate" in text and "model.rope_theta" not in text
