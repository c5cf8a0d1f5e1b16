"""Sampling arguments: every value the parser accepts gives a valid distribution; the rest are refused."""
import pytest
import torch

from sparselm.generate import filter_logits, main, sample_probs


@pytest.mark.parametrize("top_p", [0.0, 1e-9, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_sampling_distribution_is_valid_and_keeps_the_most_probable_token(top_p, top_k):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 4
    probs = sample_probs(logits, 0.8, top_k, top_p)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    best = logits.argmax(-1)
    assert (probs.gather(1, best[:, None]) > 0).all()
    torch.multinomial(probs, 1)  # raised "probability tensor contains inf, nan or element < 0" for top_p=0


def test_top_p_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    assert torch.equal(filter_logits(logits, 0, 0.0).isfinite(), torch.tensor([[False, True, False, False]]))


def test_tiny_temperature_tends_to_greedy_instead_of_nan():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1)) * 5
    probs = sample_probs(logits, 1e-40, 0, 0.9)  # logits / 1e-40 overflowed to inf: softmax gave nan
    assert torch.isfinite(probs).all()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.allclose(probs.max(-1).values, torch.ones(3))


@pytest.mark.parametrize("flag,value,words", [
    ("--top-p", "-0.1", "in [0.0, 1.0]"), ("--top-p", "1.5", "in [0.0, 1.0]"), ("--top-p", "nan", "in [0.0, 1.0]"),
    ("--temperature", "-1", ">= 0.0"), ("--temperature", "inf", ">= 0.0"), ("--top-k", "-2", ">= 0"),
    ("--max-new-tokens", "-5", ">= 0"), ("--top-k", "1.5", "not an integer"),
])
def test_out_of_range_sampling_arguments_are_refused_with_their_range(capsys, tmp_path, flag, value, words):
    with pytest.raises(SystemExit) as exc:
        main(["--ckpt", str(tmp_path), flag, value])  # refused before the checkpoint is looked at
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and words in err, err
