"""Checksums computed while writing equal those of the bytes on disk, whatever the writes' sizes; meta.json's seal."""
import json
import random

import pytest
import torch
from safetensors.torch import save

from sparselm.checkpoint.integrity import HashingStream, file_digest, header_digest, seal, unseal
from sparselm.errors import CheckpointError


@pytest.mark.parametrize("seed", range(3))
def test_digests_while_writing_equal_the_files(tmp_path, seed):
    data = save({"a": torch.arange(1000.0), "b": torch.ones(3, 7)}, metadata={"note": "x" * 50})
    rng = random.Random(seed)
    path = tmp_path / "f.safetensors"
    with open(path, "wb") as f:
        stream = HashingStream(f, safetensors=True)
        at = 0
        while at < len(data):  # writes of 1..40 bytes: the 8-byte length and the header split across them
            n = rng.randint(1, 40)
            stream.write(data[at:at + n])
            at += n
    entry = stream.entry()
    assert entry == {"bytes": len(data), "digest": file_digest(path), "header": header_digest(path)}
    assert header_digest(path) != file_digest(path)


def test_meta_json_is_sealed_by_its_own_checksum(tmp_path):
    meta = {"format": "sparselm-checkpoint", "step": 3, "checksums": {"algorithm": "xxh3_64", "files": {}}}
    text = seal(meta)
    assert unseal(tmp_path / "meta.json", text) == meta
    with pytest.raises(CheckpointError, match="meta.json' fails its checksum: xxh3_64 [0-9a-f]{16} when written, "
                                              "[0-9a-f]{16} now"):
        unseal(tmp_path / "meta.json", text.replace('"step": 3', '"step": 4'))
    with pytest.raises(CheckpointError, match="lost the checksum of its own text"):
        unseal(tmp_path / "meta.json", json.dumps(meta))
    old = {"format": "sparselm-checkpoint", "step": 3}  # written before checksums: read as it is
    assert unseal(tmp_path / "meta.json", json.dumps(old)) == old


def test_large_writes_are_hashed_beside_the_write(tmp_path):
    """Writes of 1 MiB or more are hashed on a second thread while the first writes them: same digest."""
    data = save({"big": torch.arange(700_000, dtype=torch.float32)})
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        stream = HashingStream(f, safetensors=True)
        stream.write(data[:3])
        stream.write(data[3:])
    assert stream.entry() == {"bytes": len(data), "digest": file_digest(path), "header": header_digest(path)}


def test_safetensors_are_written_from_tensor_memory_as_safetensors_would(tmp_path):
    """write_safetensors streams the header and each tensor's bytes (no whole-file buffer): the file is the one
    safetensors' own save() builds, for every dtype sparselm writes, 0-d and empty tensors and metadata, and
    its entry is the digest of those bytes."""
    from sparselm.checkpoint.files import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(3, 5, generator=g).bfloat16(), "a.f32": torch.randn(7, generator=g),
               "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.empty(0, 4),
               "mask": torch.tensor([True, False, True]), "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
               "ids": torch.arange(5), "half": torch.randn(2, generator=g).half(),
               "i8": torch.arange(3, dtype=torch.int8)}
    path = tmp_path / "model.safetensors"
    entry = write_safetensors(tensors, path, metadata={"format": "pt"})
    expected = save(tensors, metadata={"format": "pt"})
    assert path.read_bytes() == expected
    assert entry == {"bytes": len(expected), "digest": file_digest(path), "header": header_digest(path)}


def test_safetensors_writer_refuses_views_it_cannot_stream(tmp_path):
    from sparselm.checkpoint.files import write_safetensors

    with pytest.raises(CheckpointError, match="not contiguous.*contiguous"):
        write_safetensors({"t": torch.randn(4, 3).t()}, tmp_path / "x.safetensors")
