"""Evaluate a checkpoint on a dataset: ``python -m sparselm.evaluate --ckpt DIR [--data PREFIX] [--batches N]``.

Reports the mean next-token loss (nats), perplexity, bits per byte (the loss per UTF-8 byte of the
predicted text, comparable across tokenizers) and the loss at every token position (how much earlier
context helps), as JSON on stdout (and ``--out FILE``), with ``--plot FILE.png`` a picture of the
position curve.  Any checkpoint works, whatever layout saved it: the model is loaded whole on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparselm.data.loader import build_datasets, pack_dataset
from sparselm.errors import USER_ERRORS, DatasetError
from sparselm.training.runtime import quiet_third_party


@torch.no_grad()
def evaluate(model, samples, tokenizer, batches: int, batch_size: int) -> dict:
    """samples: PackedSamples (each row seq_len + 1 tokens).  Uses the first ``batches * batch_size`` rows.

    Returns {"loss", "ppl", "bits_per_byte", "tokens", "bytes", "samples", "loss_by_position"}."""
    n = min(len(samples), batches * batch_size)
    if n == 0:
        raise ValueError(f"the dataset holds no complete sample of {samples.seq_len} tokens; pass a smaller --seq-len "
                         "or more data")
    model.eval()
    seq_len = samples.seq_len
    by_position = torch.zeros(seq_len, dtype=torch.float64)
    total_bytes = 0
    for start in range(0, n, batch_size):
        rows = torch.from_numpy(samples.batch(range(start, min(n, start + batch_size))))
        logits = model(rows[:, :-1]).float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="none")
        by_position += losses.view(len(rows), seq_len).double().sum(0)
        total_bytes += sum(len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in rows)
    by_position /= n
    loss = by_position.mean().item()
    total_nats = by_position.sum().item() * n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1),
            "tokens": n * seq_len, "bytes": total_bytes, "samples": n,
            "loss_by_position": [round(v, 6) for v in by_position.tolist()]}


def plot_positions(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result["loss_by_position"]) + 1), result["loss_by_position"])
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its latest)")
    parser.add_argument("--data", default="", help="indexed dataset prefix; default: the run's validation split")
    parser.add_argument("--batches", type=int, default=8, help="batches to evaluate (>= 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (>= 1)")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence; 0: the run's data.seq_len")
    parser.add_argument("--out", default="", help="also write the JSON result to this file")
    parser.add_argument("--plot", default="", help="write the loss-by-position curve to this PNG")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.seq_len < 0:
        parser.error("--batches and --batch-size must be >= 1 and --seq-len >= 0")

    # deliberate: loading a checkpoint imports the model and parallel code; --help and bad flags stay instant
    from sparselm.checkpoint.checkpointing import load_model, load_tokenizer

    quiet_third_party()

    try:
        model, cfg = load_model(args.ckpt)
        tokenizer = load_tokenizer(args.ckpt)
        seq_len = args.seq_len or cfg.data.seq_len
        if seq_len > cfg.model.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
        samples = _samples(cfg, tokenizer, args.data, seq_len)
        result = evaluate(model, samples, tokenizer, args.batches, args.batch_size)
    except (*USER_ERRORS, ValueError) as err:
        parser.exit(2, f"sparselm.evaluate: error: {err}\n")
    result = {"checkpoint": str(args.ckpt), "data": args.data or "validation split", "seq_len": seq_len, **result}
    text = json.dumps(result)
    print(text)
    for path in (args.out, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if args.plot:
        plot_positions(result, args.plot, f"{args.ckpt}: loss {result['loss']:.3f}, {result['bits_per_byte']:.3f} bpb")
    return result


def _samples(cfg, tokenizer, prefix: str, seq_len: int):
    """The packed samples to evaluate: ``prefix``'s dataset, or the run's validation split as its config names it.
    Raises DatasetError naming an empty validation split (nothing held out) and suggesting --data."""
    if prefix:
        return pack_dataset(prefix, seq_len)
    cfg.data.seq_len = seq_len
    try:
        valid = build_datasets(cfg.data, tokenizer)[1]
    except DatasetError as err:
        raise DatasetError(f"{err} (the run's validation data, as its config names it: relative paths are read from "
                           "the current directory; pass --data PREFIX or run from the directory training ran in)") from None
    if len(valid.lengths) == 0:
        source = (f"data.valid_dataset={cfg.data.valid_dataset}" if cfg.data.valid_dataset else
                  f"data.valid_fraction={cfg.data.valid_fraction} of {cfg.data.dataset} held out no document")
        raise DatasetError(f"the run's validation split is empty ({source}); pass --data PREFIX to evaluate on "
                           "another indexed dataset")
    return valid


if __name__ == "__main__":
    main(sys.argv[1:])
