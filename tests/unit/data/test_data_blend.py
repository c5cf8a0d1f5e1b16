"""Data at pretraining scale: weighted mixtures of indexed datasets, per-source metrics and validation,
background prefetch, tokenizers saved by transformers."""
import json

import numpy as np
import pytest

from support.run import TINY, torchrun, train
from sparselm.training.metrics import read_metrics

from sparselm.config import ConfigError, load_config
from sparselm.data.blend import BlendedSamples, Source, parse_blend
from sparselm.data.packing import PackedSamples
from sparselm.data.prefetch import Prefetcher
from sparselm.data.sampler import GlobalBatchSampler
from sparselm.errors import DataExhausted, DatasetError

SMALL = TINY + ["--train.global_batch_size=10", "--data.seq_len=32", "--model.max_seq_len=32"]


def _packed(n_samples: int, seq_len: int = 8, offset: int = 0) -> PackedSamples:
    tokens = (np.arange(n_samples * seq_len + 1) + offset).astype(np.int64)
    return PackedSamples(tokens, np.array([0]), np.array([len(tokens)]), seq_len)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.3, 0.2]])
def test_each_source_share_stays_within_one_sample_of_its_weight(weights):
    sources = [Source(f"s{i}", f"p{i}", w) for i, w in enumerate(weights)]
    blend = BlendedSamples(sources, [_packed(500, offset=10_000 * i) for i in range(len(weights))], 600, 7, False)
    counts = np.zeros(len(weights))
    for i in range(len(blend)):
        counts[blend.source[i]] += 1
        assert np.all(np.abs(counts - np.array(weights) * (i + 1)) <= 1.0), (i, counts)
    # rows really come from their source, each at most once in the epoch
    rows = blend.batch(range(len(blend)))
    assert len({tuple(r) for r in rows}) == len(rows)
    assert all(int(r[0]) // 10_000 == int(blend.source[i]) for i, r in enumerate(rows))


def test_a_source_that_runs_out_is_named_or_repeats_when_allowed():
    sources = [Source("big", "pa", 0.5), Source("tiny", "pb", 0.5)]
    with pytest.raises(DataExhausted, match="blend source 'tiny' \\(pb\\) holds 10 samples"):
        BlendedSamples(sources, [_packed(100), _packed(10)], 60, 0, False)
    blend = BlendedSamples(sources, [_packed(100), _packed(10)], 60, 0, True)
    assert len(blend.batch(range(60))) == 60


@pytest.mark.parametrize("spec, words", [
    ("0.3 a 0.7", "has 3 fields"),
    ("0 a 1 b", "source 'a' has weight '0'"),
    ("-0.5 a 1 b", "weights must be positive"),
])
def test_malformed_blends_are_refused_at_load_time(spec, words):
    with pytest.raises(ConfigError, match=words):
        load_config("tiny_dense", [f"--data.dataset={spec}"])


def test_yaml_list_blend_and_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset:\n    - {prefix: /d/web, weight: 3}\n    - {prefix: /d/code, weight: 1, name: py}\n")
    sources = parse_blend(load_config(str(path)).data.dataset)
    assert [(s.name, s.prefix, s.weight) for s in sources] == [("web", "/d/web", 0.75), ("py", "/d/code", 0.25)]
    with pytest.raises(ConfigError, match="distinct name"):
        parse_blend([{"prefix": "/x/a"}, {"prefix": "/y/a"}])


def test_prefetch_yields_the_synchronous_batches():
    data = _packed(200)
    sync, ahead = GlobalBatchSampler(200, 16, 3), GlobalBatchSampler(200, 16, 3)
    prefetch = Prefetcher(lambda: data.batch(ahead.next_batch()), count=12, depth=2)
    for _ in range(12):
        assert np.array_equal(prefetch.next(), data.batch(sync.next_batch()))
    prefetch.close()
    failing = Prefetcher(lambda: data.batch(GlobalBatchSampler(10, 16, 0).next_batch()), count=3)
    with pytest.raises(DataExhausted):  # raised where the synchronous read would have raised it
        failing.next()


# ------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tools.preprocess_data import main as preprocess

    root = tmp_path_factory.mktemp("blend")
    for name, n, word in (("web", 200, "alpha"), ("code", 300, "beta")):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{word} document {i}. " * 20}) + "\n"
                                                     for i in range(n)))
        preprocess(["--input", str(root / f"{name}.jsonl"), "--output-prefix", str(root / name), "--append-eod"])
    return root


@pytest.fixture(scope="module")
def blend_runs(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("blend_runs")
    blend = f"--data.dataset=0.3 {sources / 'web'} 0.7 {sources / 'code'}"
    args = SMALL + [blend, "--train.steps=4", "--train.eval_every=2", "--train.save_every=2", "--train.keep_last=0"]
    train(args + [f"--train.out_dir={root / 'one'}"])
    train(args + [f"--train.out_dir={root / 'sync'}", "--data.prefetch=0"])
    train(args + [f"--train.out_dir={root / 'dp2'}"], launcher=torchrun(2))
    train(args + [f"--train.out_dir={root / 'resumed'}", f"--train.resume={root / 'one' / 'checkpoints' / 'step_2'}"])
    return {name: [r for r in read_metrics(root / name) if "loss" in r] for name in ("one", "sync", "dp2", "resumed")}


def test_blended_run_logs_per_source_samples_at_the_weights(blend_runs):
    for row in blend_runs["one"]:
        consumed = row["step"] * 10
        assert row["data/web_samples"] + row["data/code_samples"] == consumed
        assert abs(row["data/web_samples"] - 0.3 * consumed) <= 1


def test_per_source_validation_losses(blend_runs):
    row = blend_runs["one"][-1]
    assert row["val_loss"] == pytest.approx(0.3 * row["val_loss/web"] + 0.7 * row["val_loss/code"], rel=1e-6)


@pytest.mark.parametrize("other", ["sync", "dp2", "resumed"])
def test_the_same_samples_under_prefetch_dp2_and_resume(blend_runs, other):
    reference = {r["step"]: r for r in blend_runs["one"]}
    for row in blend_runs[other]:
        ref = reference[row["step"]]
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), (other, row["step"])
        assert row["data/web_samples"] == ref["data/web_samples"]
    assert [r["step"] for r in blend_runs["resumed"]] == [3, 4]


def test_blend_bad_inputs_name_the_source(sources, tmp_path):
    from sparselm.data.tokenizer import train_bpe
    from tools.preprocess_data import main as preprocess

    proc = train(SMALL + [f"--data.dataset=0.5 {sources / 'web'} 0.5 /nonexistent/other", f"--train.out_dir={tmp_path / 'a'}"],
                 check=False)
    assert proc.returncode == 2 and "'/nonexistent/other.bin' does not exist" in proc.stderr
    tok = train_bpe(["some other text " * 50], 280, tmp_path / "tok.json")
    preprocess(["--input", str(sources / "web.jsonl"), "--output-prefix", str(tmp_path / "bpe_web"),
                "--tokenizer", str(tok.path), "--append-eod"])
    proc = train(SMALL + [f"--data.dataset=0.5 {sources / 'code'} 0.5 {tmp_path / 'bpe_web'}", f"--train.out_dir={tmp_path / 'b'}"],
                 check=False)
    assert proc.returncode == 2 and "source 'bpe_web'" in proc.stderr and "tokenized with the bpe-" in proc.stderr
    proc = train(SMALL + [f"--data.dataset=0.01 {sources / 'code'} 0.99 {sources / 'web'}", "--train.steps=5000",
                          f"--train.out_dir={tmp_path / 'c'}"], check=False)
    assert proc.returncode == 2 and "blend source 'web'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_tokenizer_saved_by_transformers_works_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sparselm.data.tokenizer import load_tokenizer
    from tools.preprocess_data import main as preprocess

    text = "def add(a, b):\n    return a + b\n" * 100
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eot|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eot|>")
    fast.save_pretrained(str(tmp_path / "hf_tok"))
    path = tmp_path / "hf_tok" / "tokenizer.json"
    tok = load_tokenizer(str(path))  # the end of document comes from tokenizer_config.json's eos_token
    assert tok.eod_id == fast.eos_token_id and tok.decode(tok.encode(text)) == text
    (tmp_path / "hf_tok" / "tokenizer_config.json").unlink()
    with pytest.raises(DatasetError, match="data.eod_token"):
        load_tokenizer(str(path))
    assert load_tokenizer(str(path), "<|eot|>").eod_id == fast.eos_token_id
    (tmp_path / "c.txt").write_text(text)
    prefix = preprocess(["--input", str(tmp_path / "c.txt"), "--output-prefix", str(tmp_path / "d"), "--tokenizer",
                         str(path), "--eod-token", "<|eot|>", "--append-eod"])[0]
    train(TINY + ["--train.steps=1", f"--data.dataset={prefix}", f"--data.valid_dataset={prefix}",
                  f"--data.tokenizer={path}", "--data.eod_token=<|eot|>", "--data.seq_len=16", "--model.max_seq_len=16",
                  "--train.global_batch_size=2", f"--train.out_dir={tmp_path / 'run'}"])
