"""The eval harness: every task's number against an independent computation on a tiny model, the cache, the
outputs (table, plots), the command line, 2 processes = 1 process, and lm-eval offline on a local JSONL task."""

import json
import math
import subprocess

import pytest
import torch
from support import BIN, ROOT, free_port

from posttrain import UserError
from posttrain.evals import tasks as eval_tasks
from posttrain.evals.common import EvalContext, eval_rows, load_checkpoint
from posttrain.evals.harness import make_spec, markdown_table, run_eval
from posttrain.recipes.config import builtin_recipes


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer, path = load_checkpoint("tiny:llama")
    return EvalContext(model, tokenizer, "tiny:llama", path, limit=6, batch_size=4)


def _logp(model, tokenizer, prompt_text, completion_text):
    """log p(completion | prompt), one unpadded sequence at a time."""
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    start = max(len(p), 1) - 1
    return float(logps[start:].gather(-1, targets[start:, None]).sum())


def test_perplexity_against_a_token_by_token_loss(tiny):
    out = eval_tasks.perplexity(tiny)["metrics"]
    texts = eval_rows("builtin:fictitious_facts", "", split="retain", num_samples=256, limit=6)["text"]
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(
                tiny.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), torch.tensor(ids[1:]), reduction="sum"
            )
        nll, tokens = nll + float(loss), tokens + len(ids) - 1
    assert out["tokens"] == tokens
    assert out["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_preference_accuracy_and_margin_from_known_logps(tiny, tmp_path):
    # the reference: the same tiny model with perturbed weights, so the implicit reward is not just log pi
    ref, _, _ = load_checkpoint("tiny:llama")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(tmp_path / "ref")
    tiny.tokenizer.save_pretrained(tmp_path / "ref")
    out = eval_tasks.preference(tiny, reference=str(tmp_path / "ref"), beta=0.5)["metrics"]
    rows = eval_rows("builtin:preference_pairs", "preference", num_samples=256, limit=6)
    tok = tiny.tokenizer
    margins = []
    for row in rows:
        prompt_text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        rewards = []
        for answer in (row["chosen"], row["rejected"]):
            completion = tok.apply_chat_template(row["prompt"] + answer, tokenize=False)[len(prompt_text) :]
            rewards.append(
                0.5 * (_logp(tiny.model, tok, prompt_text, completion) - _logp(ref, tok, prompt_text, completion))
            )
        margins.append(rewards[0] - rewards[1])
    assert out["pairs"] == 6
    assert out["margin"] == pytest.approx(sum(margins) / 6, abs=1e-3)
    assert out["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 6)  # no exact ties here
    assert 0 < out["accuracy"] < 1 or abs(out["margin"]) > 0.1


def test_pass_at_k_on_fixed_samples_is_the_closed_form(tiny, monkeypatch):
    # n = 8 samples per prompt, of which prompt i gets c_i correct: pass@k = 1 - C(n - c, k) / C(n, k)
    n, correct = 8, [0, 1, 3, 8, 5, 2]
    rows = eval_rows("builtin:arithmetic", "prompt", num_samples=64, limit=6, difficulty=1)
    answer_of = {json.dumps(p): a for p, a in zip(rows["prompt"], rows["answer"])}
    count_of = {json.dumps(p): c for p, c in zip(rows["prompt"], correct)}

    def fake_generate(model, tokenizer, prompts, *, n=1, temperature=0.0, **kw):
        if temperature == 0:  # greedy: right on even-count prompts
            return [
                [f"The answer is {answer_of[json.dumps(p)] if count_of[json.dumps(p)] % 2 == 0 else -1}."]
                for p in prompts
            ]
        return [
            [f"The answer is {answer_of[json.dumps(p)]}."] * count_of[json.dumps(p)]
            + ["The answer is -1."] * (n - count_of[json.dumps(p)])
            for p in prompts
        ]

    monkeypatch.setattr(eval_tasks, "generate", fake_generate)
    out = eval_tasks.math_task(tiny, n=n, k=(1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        expected = sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in correct) / len(correct)
        assert out["metrics"][f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert out["metrics"]["greedy_accuracy"] == pytest.approx(3 / 6)  # counts 0, 8 and 2 are even
    assert out["curves"]["pass@k"]["x"] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="n >= 16"):
        eval_tasks.math_task(tiny, n=8, k=(1, 16))


def test_reward_task_scores_the_completions(tiny, monkeypatch):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["What a wonderful film!", "Awful, boring and sad.", "It is a phone.", "I love it", "bad", "fine"]
    monkeypatch.setattr(
        eval_tasks, "generate", lambda model, tok, prompts, **kw: [[texts[i % 6]] for i, _ in enumerate(prompts)]
    )
    out = eval_tasks.reward(tiny, reward_funcs=("vader_sentiment", "distinct_2"))["metrics"]
    batches = [texts[:4], texts[:2]]  # batch_size 4: the fake numbers completions per batch
    flat = [t for b in batches for t in b]
    analyzer = SentimentIntensityAnalyzer()
    assert out["vader_sentiment"] == pytest.approx(sum(analyzer.polarity_scores(t)["compound"] for t in flat) / 6)
    assert out["distinct_2"] == 1.0


def test_moe_balance_counts_the_routers_choices():
    from collections import Counter

    model, tokenizer, _ = load_checkpoint("tiny:deepseek_v3")
    ctx = EvalContext(model, tokenizer, "tiny:deepseek_v3", "", limit=4, batch_size=2)
    out = eval_tasks.moe_balance(ctx)
    counts: dict[str, Counter] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, i, o, name=name: counts.setdefault(name, Counter()).update(o[2].flatten().tolist())
        )
        for name, m in model.named_modules()
        if type(m).__name__ == "DeepseekV3TopkRouter"
    ]
    texts = eval_rows("builtin:fictitious_facts", "", split="retain", num_samples=256, limit=4)["text"]
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding to leave out
            model(input_ids=torch.tensor([tokenizer(t)["input_ids"]]))
    for h in hooks:
        h.remove()
    E = model.config.n_routed_experts
    vios = []
    for c in counts.values():
        load = [c[e] for e in range(E)]
        vios.append((max(load) - sum(load) / E) / (sum(load) / E))
    assert out["metrics"]["maxvio_global"] == pytest.approx(sum(vios) / len(vios), rel=1e-6)
    assert len(out["per_layer"]) == len(counts)


LM_EVAL_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_a_local_jsonl_task_offline(tiny, tmp_path):
    docs = [
        {"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (7, 3)]
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_choice.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "docs.jsonl"))
    ctx = EvalContext(tiny.model, tiny.tokenizer, "tiny:llama", tiny.path, limit=None, batch_size=4)
    out = eval_tasks.lm_eval(ctx, tasks=("tiny_choice",), include_path=str(tmp_path), include_defaults=False)["metrics"]
    # lm-eval's multiple choice: argmax over choices of log p(" " + choice | question)
    hits = []
    for d in docs:
        scores = [_logp(tiny.model, tiny.tokenizer, d["question"], " " + c) for c in d["choices"]]
        hits.append(max(range(3), key=scores.__getitem__) == d["label"])
    assert out["tiny_choice/acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_preference_against_the_model_itself_is_chance(tiny):
    out = eval_tasks.preference(tiny, reference="tiny:llama")["metrics"]
    assert out["margin"] == 0 and out["accuracy"] == 0.5  # every implicit reward is exactly 0: ties count half


def test_cache_outputs_and_table(tmp_path, capsys):
    spec = make_spec(
        {
            "model": "tiny:llama",
            "compare": ["tiny:qwen3"],
            "tasks": "perplexity,preference",
            "limit": 4,
            "output": str(tmp_path / "ev"),
        }
    )
    report = run_eval(spec, log=lambda *a: None)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert (
        saved["results"]["tiny:qwen3"]["perplexity"]["metrics"]
        == report["results"]["tiny:qwen3"]["perplexity"]["metrics"]
    )
    assert saved["versions"]["trl"] and saved["processes"] == 1
    table = (tmp_path / "ev" / "results.md").read_text()
    assert table == markdown_table(saved) and "`tiny:llama` | `tiny:qwen3`" in table
    for png in ("perplexity.png", "preference.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 1000
    # a second run is served from the cache: it never loads a model
    import posttrain.evals.common as common

    def no_load(*a, **k):
        raise AssertionError("a cached result loaded the model")

    original, common.load_checkpoint = common.load_checkpoint, no_load
    try:
        again = run_eval(spec, log=lambda *a: None)
    finally:
        common.load_checkpoint = original
    assert again["results"] == report["results"] | {m: again["results"][m] for m in again["results"]}
    assert (
        again["results"]["tiny:llama"]["perplexity"]["metrics"]
        == report["results"]["tiny:llama"]["perplexity"]["metrics"]
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": "tiny:llama", "tasks": "perplexty"}, "unknown eval task"),
        ({"model": "tiny:llama", "tasks": {"math": {"samples": 3}}}, r"has no option\(s\) samples"),
        ({"model": "./no/such/ckpt", "tasks": "perplexity"}, "does not exist"),
        ({"tasks": "perplexity"}, "name the checkpoint"),
        ({"model": "tiny:llama", "tasks": "perplexity", "lmit": 3}, "unknown eval key"),
    ],
)
def test_bad_eval_input_is_one_clear_error(values, message):
    with pytest.raises(UserError, match=message):
        make_spec(values)


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path, run_env):
    args = [
        "eval",
        "--model",
        "tiny:llama",
        "--tasks",
        "preference,perplexity,math",
        "--limit",
        "6",
        "--batch_size",
        "2",
        "--task_config",
        "{math: {n: 4, k: [1, 2, 4], max_new_tokens: 8}}",
        "--no_cache",
    ]
    one = subprocess.run(
        [str(BIN / "posttrain"), *args, "--output", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=ROOT,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "posttrain",
            *args,
            "--output",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=ROOT,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["processes"] == 2 and a["processes"] == 1
    for task in ("preference", "perplexity", "math"):
        x, y = a["results"]["tiny:llama"][task]["metrics"], b["results"]["tiny:llama"][task]["metrics"]
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (task, key)


def test_eval_recipe_with_cli_overrides(tmp_path):
    from posttrain.cli import main

    assert main(["eval", "eval/tiny", "--tasks", "perplexity", "--limit", "2", "--output", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == ["tiny:llama", "tiny:qwen3"] and list(saved["tasks"]) == ["perplexity"]
    assert saved["limit"] == 2 and saved["results"]["tiny:qwen3"]["perplexity"]["metrics"]["perplexity"] > 1


def test_report_plots_a_training_run(tmp_path):
    from posttrain.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "constrained_rlhf/tiny",
                "--output_dir",
                str(run),
                "--max_steps",
                "2",
                "--save_strategy",
                "steps",
                "--save_steps",
                "2",
            ]
        )
        == 0
    )
    assert main(["report", str(run)]) == 0
    pngs = {p.name: p.stat().st_size for p in (run / "report").glob("*.png")}
    assert {"loss.png", "constrained.png", "rewards.png"} <= set(pngs) and min(pngs.values()) > 1000
    table = (run / "report" / "report.md").read_text()
    assert "| constrained/lambda/vader_sentiment |" in table
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_a_lora_run_output_is_evaluated_on_its_base(tmp_path):
    from posttrain.cli import main

    run = tmp_path / "lora"
    assert (
        main(
            [
                "train",
                "sft/tiny",
                "--output_dir",
                str(run),
                "--use_peft",
                "true",
                "--max_steps",
                "3",
                "--learning_rate",
                "5e-2",
            ]
        )
        == 0
    )
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()
    scores = {}  # sft/tiny trains a LoRA adapter on tiny:qwen3
    for label, values in {
        "folder": {"model": str(run)},
        "flag": {"model": "tiny:qwen3", "peft": str(run)},
        "base": {"model": "tiny:qwen3"},
    }.items():
        report = run_eval(
            make_spec({**values, "tasks": "perplexity", "limit": 4, "cache": False, "output": str(tmp_path / label)}),
            log=lambda *a: None,
        )
        scores[label] = report["results"][values["model"]]["perplexity"]["metrics"]["perplexity"]
    assert scores["folder"] == pytest.approx(scores["flag"], rel=1e-6)
    assert abs(scores["folder"] - scores["base"]) > 1e-3 * scores["base"]  # the adapter is applied


def test_unlearning_task_scores_the_training_splits(tiny):
    # the task reads the run's own forget/retain/world splits (data seed 0) and per-row answer losses: check the
    # forget loss against a per-row token-mean CE of the answers computed here
    from posttrain.data.loading import load_source

    out = eval_tasks.unlearning(tiny, forget="forget01", num_samples=200)["metrics"]
    rows = load_source("builtin:fictitious_authors", split="forget01", num_samples=200, seed=0).select(range(6))
    tok, losses = tiny.tokenizer, []
    for row in rows:
        prompt_text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        completion = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)[len(prompt_text) :]
        n = len(tok(completion, add_special_tokens=False)["input_ids"])
        losses.append(-_logp(tiny.model, tok, prompt_text, completion) / n)
    assert {"forget_loss", "retain_loss", "world_loss", "forget_acc"} <= set(out)
    assert out["forget_loss"] == pytest.approx(sum(losses) / len(losses), rel=0.05)
    assert "forget_quality_vs_retain_model" not in out
    # TOFU's forget quality against a retain-only model: the model against itself has identical truth ratios
    same = eval_tasks.unlearning(tiny, forget="forget01", num_samples=200, retain_model="tiny:llama")["metrics"]
    assert same["forget_quality_vs_retain_model"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", builtin_recipes(kind="eval"))
def test_every_eval_recipe_loads_and_names_its_command(name):
    from posttrain.evals.harness import load_eval_recipe
    from posttrain.recipes.config import find_recipe

    spec = load_eval_recipe(name, {})  # task names and options are checked against the task functions
    assert spec.models and spec.tasks
    assert find_recipe(name).read_text().splitlines()[0] == f"# posttrain eval {name}"
