"""Sample text from a checkpoint: ``python -m sparselm.generate --ckpt DIR --prompt TEXT``."""
from __future__ import annotations

import argparse
import math

import torch

from sparselm.checkpoint.checkpointing import CheckpointError, load_model, load_tokenizer
from sparselm.training.runtime import quiet_third_party


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the top_k logits and the smallest set whose probability reaches top_p.

    logits: [..., vocab].  The most probable token always survives, so top_p=0 or a tiny top_p means
    greedy rather than an empty distribution (the nucleus of Holtzman et al. 2020 is never empty)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next-token distribution [..., vocab] from fp32 logits at temperature > 0.

    The largest logit is subtracted before dividing, so a tiny temperature tends to greedy instead of
    overflowing to inf/nan."""
    shifted = logits - logits.max(-1, keepdim=True).values
    return filter_logits(shifted / temperature, top_k, top_p).softmax(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eod_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Autoregressive sampling; temperature 0 is greedy.  The context is cropped to max_seq_len."""
    max_len = model.config.model.max_seq_len
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = sample_probs(logits, temperature, top_k, top_p)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
        if eod_id is not None and bool((nxt == eod_id).all()):
            break
    return ids


def _bounded(kind, low, high=None):
    """argparse type: ``kind`` within [low, high]; a value outside is refused with the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {span}")
        return value
    return parse


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its latest)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=_bounded(int, 0), default=200, help="tokens to add (>= 0)")
    parser.add_argument("--temperature", type=_bounded(float, 0.0), default=0.8, help="softmax temperature (>= 0); 0 means greedy")
    parser.add_argument("--top-k", type=_bounded(int, 0), default=0, help="sample among the k most probable tokens (>= 0); 0 keeps all")
    parser.add_argument("--top-p", type=_bounded(float, 0.0, 1.0), default=0.95,
                        help="nucleus sampling: the smallest set of tokens whose probability reaches p, in [0, 1] "
                             "(the most probable token is always kept, so 0 is greedy); 1 keeps all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    quiet_third_party()

    try:
        model, cfg = load_model(args.ckpt)
        tokenizer = load_tokenizer(args.ckpt)
    except CheckpointError as err:
        parser.exit(2, f"sparselm.generate: error: {err}\n")
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eod_id]
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   tokenizer.eod_id, gen)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


if __name__ == "__main__":
    main()
