"""The planner counts context parallelism: per-rank activations of 1/cp of the tokens, ZeRO partitions over
data x context ranks, the Ulysses all-to-alls in the communication and the step time, the same total FLOPs;
and the multi-token-prediction depths' activations."""
from sparselm.config import load_config
from sparselm.planning.planner import plan_layout


def _plan(cp: int):
    cfg = load_config("tiny_dense", ["--model.vocab_size=256", "--data.seq_len=2048", "--model.max_seq_len=2048",
                                     "--train.global_batch_size=8", "--train.micro_batch_size=2",
                                     "--model.loss_chunk_tokens=0", f"--parallel.cp={cp}"], check=False)
    return plan_layout(cfg, 4, 80)


def test_cp_divides_activations_partitions_over_dp_x_cp_and_adds_its_all_to_alls():
    one, two = _plan(1), _plan(2)  # 4 ranks: dp4 against dp2 x cp2, same micro-batch of 2 sequences
    assert (one.layout.dp, two.layout.dp, two.layout.cp) == (4, 2, 2)
    r1, r2 = one.ranks[0], two.ranks[0]
    assert r2.activations["per_micro_batch"] == r1.activations["per_micro_batch"] / 2
    # ZeRO-1 partitions over the 4 data x context ranks in both: the same optimizer state per rank
    assert r2.gpu["fp32 master + Adam + fp32 gradients"] == r1.gpu["fp32 master + Adam + fp32 gradients"]
    assert one.comm["all-to-all cp"] == 0 < two.comm["all-to-all cp"]
    assert two.time["comm_s"]["cp"] > 0
    assert two.time["model_flops_per_step"] == one.time["model_flops_per_step"]
    assert two.micro_batches == 2 * one.micro_batches  # each cp rank runs all of its dp rank's micro-batches


def test_mtp_depths_add_activations_recomputed_as_the_decoder_layers():
    """Multi-token-prediction depths add their blocks' activations, recomputed as parallel.recompute chooses
    them (numbered after the decoder layers), and their own inputs, projection and log-probabilities, which are
    always kept: with every block recomputed a depth adds less under full than selective than none; with
    recompute_every=4 (the 4 layers' last only) its block keeps everything; two depths add twice one's
    (tools/bench_memory.py measures the figures against autograd's saved tensors)."""
    def added(mtp: int, every: int) -> dict:
        rank = {}
        for depths in (0, mtp):
            cfg = load_config("tiny_deepseek", ["--model.vocab_size=512", f"--model.mtp_layers={depths}",
                                                f"--parallel.recompute_every={every}"])
            rank[depths] = plan_layout(cfg, 1, 80).ranks[0].activations
        return {k: rank[mtp][k] - rank[0][k] for k in ("per_micro_batch", "per_micro_batch_full",
                                                      "per_micro_batch_selective")}

    one, two = added(1, 1), added(2, 1)
    assert one["per_micro_batch"] > one["per_micro_batch_selective"] > one["per_micro_batch_full"] > 0
    assert two == {k: 2 * v for k, v in one.items()}
    assert len(set(added(1, 4).values())) == 1
