"""Helper process for test_checkpoint_crash: trains one step, then saves checkpoints in a loop
until it is killed. Prints 'saved N' after each save (with ``async`` as second argument: after each save was
started, the previous one being complete)."""
import sys

from sparselm.config import load_config
from sparselm.training.trainer import Trainer

out_dir = sys.argv[1]
cfg = load_config("tiny_dense", ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2", "--data.seq_len=32",
                                 "--model.max_seq_len=32", "--train.global_batch_size=8", "--train.progress=false",
                                 "--train.tensorboard=false", "--train.eval_every=0", "--train.keep_last=2",
                                 f"--train.out_dir={out_dir}", "--train.resume=latest", "--train.steps=100000",
                                 f"--train.async_save={len(sys.argv) > 2 and sys.argv[2] == 'async'}"])
trainer = Trainer(cfg)
trainer.train_step(trainer.train_data.batch(trainer._rank_slice(trainer.sampler.next_batch())))
while True:
    trainer.step += 1
    trainer.save()
    print(f"saved {trainer.step}", flush=True)
