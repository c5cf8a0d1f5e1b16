"""The planner counts context parallelism: per-rank activations of 1/cp of the tokens, ZeRO partitions over
data x context ranks, the Ulysses all-to-alls in the communication and the step time, the same total FLOPs."""
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
