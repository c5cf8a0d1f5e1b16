"""Tokenizers, Megatron indexed-dataset compatibility, packing and the sampler."""
import json

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from support.run import PYTHON, TINY, run_cmd, train

from sparselm.data.indexed import DatasetError, flat_tokens, open_indexed, write_indexed
from sparselm.data.packing import PackedSamples
from sparselm.data.sampler import DataExhausted, GlobalBatchSampler
from sparselm.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

TEXTS = ["def f(x):\n    return x * 2\n", "héllo wörld — ünïcode ✓", "", "class A:\n    pass\n" * 3]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert max(ids, default=0) < 256
        assert tok.decode(ids + [tok.eod_id]) == text


def test_bpe_trains_locally_and_round_trips(tmp_path):
    tok = train_bpe(TEXTS * 20, vocab_size=300, out_path=tmp_path / "tok.json")
    again = load_tokenizer(str(tmp_path / "tok.json"))
    for text in TEXTS:
        ids = again.encode(text)
        assert again.decode(ids) == text
    assert len(again.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges were learned
    assert tok.eod_id == again.eod_id


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


def _docs(seed=0, n=7):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 257, size=rng.integers(1, 50)).tolist() for _ in range(n)]


def test_our_files_open_with_megatron_reader(tmp_path):
    docs = _docs()
    write_indexed(tmp_path / "ours", docs, vocab_size=257)
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc


def test_megatron_files_open_with_our_reader(tmp_path):
    docs = _docs(1)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    ds = open_indexed(tmp_path / "theirs")
    assert flat_tokens(ds).tolist() == [t for d in docs for t in d]


def test_corrupt_or_missing_index_is_a_clear_error(tmp_path):
    write_indexed(tmp_path / "d", _docs(), vocab_size=257)
    with pytest.raises(DatasetError, match="does not exist"):
        open_indexed(tmp_path / "missing")
    bin_bytes = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(bin_bytes[:-3])
    with pytest.raises(DatasetError, match="truncated or mismatched"):
        open_indexed(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(DatasetError, match="corrupt"):
        open_indexed(tmp_path / "d")


def test_preprocess_tool_output_matches_megatron_reader(tmp_path):
    from tools.preprocess_data import main

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "meta": i}) for i, t in enumerate(TEXTS)) + "\n")
    (tmp_path / "extra.txt").write_text("plain text file\n")
    [prefix] = main(["--input", str(jsonl), str(tmp_path / "extra.txt"), "--output-prefix", str(tmp_path / "out"),
                     "--json-keys", "text", "--append-eod", "--workers", "2"])
    ds = IndexedDataset(prefix)
    tok = ByteTokenizer()
    expected = [tok.encode(t) + [tok.eod_id] for t in TEXTS + ["plain text file\n"]]
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_preprocess_names_a_missing_json_key(tmp_path):
    from tools.preprocess_data import main

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no key 'text'.*body"):
        main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "o")])


def test_packing_is_the_concatenated_stream():
    docs = _docs(2, n=9)
    stream = np.array([t for d in docs for t in d])
    lengths = np.array([len(d) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    packed = PackedSamples(stream, offsets, lengths, seq_len=10)
    assert len(packed) == (len(stream) - 1) // 10
    for i in range(len(packed)):
        assert packed[i].tolist() == stream[i * 10: i * 10 + 11].tolist()
    # a subset of documents packs only those documents, in order
    keep = [0, 2, 5]
    sub = PackedSamples(stream, offsets[keep], lengths[keep], seq_len=4)
    sub_stream = [t for k in keep for t in docs[k]]
    assert sub[0].tolist() == sub_stream[:5]


def test_sampler_is_deterministic_never_repeats_and_resumes():
    a = GlobalBatchSampler(100, 8, seed=3)
    batches = [a.next_batch() for _ in range(12)]
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen) == 96
    b = GlobalBatchSampler(100, 8, seed=3)
    assert all((b.next_batch() == x).all() for x in batches[:5])
    resumed = GlobalBatchSampler(100, 8, seed=3)
    resumed.load_state_dict(b.state_dict())
    assert all((resumed.next_batch() == x).all() for x in batches[5:])
    assert not (GlobalBatchSampler(100, 8, seed=4).next_batch() == batches[0]).all()
    with pytest.raises(DataExhausted, match="allow_repeat"):
        a.next_batch()


def test_sampler_repeats_only_when_allowed():
    s = GlobalBatchSampler(10, 4, seed=0, allow_repeat=True)
    epoch = np.concatenate([s.next_batch() for _ in range(5)])
    assert sorted(epoch[:10].tolist()) == list(range(10))
    assert s.steps_available() is None


def test_default_corpus_split_is_disjoint_and_deterministic():
    from sparselm.data.corpus import is_valid_split, stdlib_files

    files = [str(f) for f in stdlib_files()]
    valid = [f for f in files if is_valid_split(f, 0.02)]
    assert 0 < len(valid) < 0.1 * len(files)
    assert valid == [f for f in files if is_valid_split(f, 0.02)]


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line,words", [
    ('{"text": null}', "in.jsonl:2 has 'text': null (null), not a string"),
    ('{"text": 123}', "in.jsonl:2 has 'text': 123 (int), not a string"),
    ('{"text": ["a"]}', "in.jsonl:2 has 'text': [\"a\"] (list), not a string"),
    ('"a line holding the word text"', "in.jsonl:2 is a JSON str, not an object"),  # was a TypeError
])
def test_preprocess_stops_at_a_record_that_is_not_text(tmp_path, line, words):
    from sparselm.data.sources import RecordError
    from tools.preprocess_data import main

    src = _jsonl(tmp_path / "in.jsonl", ['{"text": "abc"}', line])
    with pytest.raises(RecordError) as err:
        main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--append-eod"])
    assert words in str(err.value) and "--skip-invalid-records" in str(err.value)
    assert not list(tmp_path.glob("o*")), "nothing is left under the output prefix"


def test_preprocess_skips_and_counts_invalid_records_when_asked(tmp_path, capsys):
    from tools.preprocess_data import main

    src = _jsonl(tmp_path / "in.jsonl", ['{"text": null}', '{"text": "abc"}', '{"text": 123}', '{"body": "x"}'])
    [prefix] = main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--append-eod",
                     "--skip-invalid-records"])
    tok = ByteTokenizer()
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode("abc") + [tok.eod_id]]  # not "None", "123"
    out = capsys.readouterr().out
    assert "1 document," in out and "skipped 2 ('text' not a string)" in out and "skipped 1 (no key 'text')" in out


def test_preprocess_of_empty_input_fails_and_writes_nothing(tmp_path):
    src = _jsonl(tmp_path / "empty.jsonl", [])
    proc = run_cmd([PYTHON, "tools/preprocess_data.py", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                    "--append-eod"], check=False)
    assert proc.returncode == 2
    assert "preprocess_data.py: error: no token to write" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("o*"))


def test_a_dataset_without_tokens_is_named_as_such(tmp_path):

    IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16).finalize(str(tmp_path / "empty.idx"))
    with pytest.raises(DatasetError, match="holds no tokens"):
        open_indexed(tmp_path / "empty")
    proc = train(TINY + ["--train.steps=1", f"--data.dataset={tmp_path / 'empty'}",
                         f"--train.out_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode != 0
    assert "holds no tokens" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_an_empty_validation_split_is_an_error_not_a_silent_skip(tmp_path):
    from tools.preprocess_data import main

    (tmp_path / "one.txt").write_text("one long document. " * 500)
    [prefix] = main(["--input", str(tmp_path / "one.txt"), "--output-prefix", str(tmp_path / "one"), "--append-eod"])
    proc = train(TINY + ["--train.steps=1", "--train.eval_every=1", f"--data.dataset={prefix}",
                         f"--train.out_dir={tmp_path / 'run'}"], check=False)  # its one document is held for training
    assert proc.returncode != 0
    assert "the validation split holds 0 samples" in proc.stderr and "train.eval_every=0" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
