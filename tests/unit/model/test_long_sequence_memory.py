"""Long-sequence memory traps removed without changing numbers: rotary tables computed per call (no
per-layer table sized to model.max_seq_len), the loss's fp32 logits computed a chunk of tokens at a time."""
import torch
import torch.nn.functional as F

from sparselm.config import load_config
from sparselm.model import build_model
from sparselm.model.rotary import Rotary, rope_frequencies


def tiny_cfg(*extra):
    return load_config("tiny_dense", ["--model.vocab_size=192", "--model.d_model=32", "--model.n_layers=2",
                                      "--model.n_heads=4", "--model.n_kv_heads=2", "--data.seq_len=24", *extra])


def full_table(mcfg, t):
    """The per-layer table the model used to keep, rows 0..t-1 (fp32, built to max_seq_len)."""
    inv_freq, scale = rope_frequencies(mcfg)
    angles = torch.arange(mcfg.max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * scale)[:t], (emb.sin() * scale)[:t]


def test_rotary_holds_no_length_sized_table_and_equals_the_full_table_bitwise():
    short, long = (tiny_cfg(f"--model.max_seq_len={n}", "--model.rope.scaling=yarn", "--model.rope.factor=4",
                            "--model.rope.original_max_seq_len=16") for n in (32, 65536))
    buffers = [sum(b.numel() for b in build_model(c, device="meta").buffers()) for c in (short, long)]
    assert buffers[0] == buffers[1]  # nothing scales with model.max_seq_len
    rotary = Rotary(long.model)
    x = torch.randn(2, 3, 40, long.model.head_width)
    positions = torch.arange(30000, 30040)
    cos, sin = full_table(long.model, 30040)
    x1, x2 = x.chunk(2, dim=-1)
    expected = x * cos[30000:] + torch.cat([-x2, x1], dim=-1) * sin[30000:]
    assert torch.equal(rotary(x, positions), expected)
    assert torch.equal(rotary(x[:, :, :5]), x[:, :, :5] * cos[:5] + torch.cat([-x2, x1], -1)[:, :, :5] * sin[:5])
    half = rotary.to(torch.bfloat16)  # a cast model keeps fp32 frequencies: rows equal the fp32 table's, rounded
    assert half.inv_freq.dtype == torch.float32
    assert torch.equal(half.table(positions, torch.bfloat16)[0], cos[30000:].to(torch.bfloat16))


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(ids, labels)
    out.loss.backward()
    return out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_equals_whole_batch_loss_and_keeps_no_whole_logits():
    ids = torch.randint(0, 192, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[0, :5] = -100  # ignored labels inside a chunk and across chunk boundaries
    whole = build_model(tiny_cfg("--model.loss_chunk_tokens=0")).double()
    chunked = build_model(tiny_cfg("--model.loss_chunk_tokens=7")).double()  # 72 tokens: 11 chunks, the last short
    loss0, grads0 = _loss_and_grads(whole, ids, labels)
    loss1, grads1 = _loss_and_grads(chunked, ids, labels)
    # the loss is taken in fp32 (as before): chunks change only the fp32 summation order
    ref = F.cross_entropy(whole(ids).float().reshape(-1, 192), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss0, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-9, msg=name)

    def saved_logit_bytes(model):
        """Largest tensor autograd keeps from the forward with the vocabulary as last dimension."""
        sizes = []

        def pack(t):
            if t.dim() and t.shape[-1] == 192:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels).loss.backward()
        return max(sizes, default=0)

    assert saved_logit_bytes(whole.float()) >= ids.numel() * 192
    assert saved_logit_bytes(chunked.float()) <= 7 * 192  # a chunk's worth, during its recomputation only
