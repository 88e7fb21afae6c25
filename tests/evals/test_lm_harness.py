"""The ``lm_eval`` task gives what ``lm_eval.simple_evaluate`` gives: a local YAML task with two filters and a group
of two tasks, every ``metric,filter`` key and standard error kept, groups apart, lm-eval's seeds by default, samples
written beside results.json."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from support import free_port

from posttrain.evals import tasks as eval_tasks
from posttrain.evals.common import EvalContext, load_checkpoint

torch.set_num_threads(1)

CHOICE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

# two filters on one generation: "strict" keeps "#### <number>" (else "[invalid]"), "loose" the first word
GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9]+)"
      - function: take_first
  - name: loose
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
      - function: take_first
"""

GROUP = """group: tiny_group
task: [tiny_choice_a, tiny_choice_b]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, path = load_checkpoint("tiny:llama")
    return EvalContext(model, tokenizer, "tiny:llama", path, limit=None, batch_size=4)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, offset in (("tiny_choice_a", 0), ("tiny_choice_b", 1)):
        docs = [
            {
                "question": f"{a} plus {b} is",
                "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
                "label": (a + offset) % 3,
            }
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (7, 3), (4, 4), (6, 2), (8, 1)]
        ]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
        (d / f"{name}.yaml").write_text(CHOICE.format(name=name, data=d / f"{name}.jsonl"))
    # the strict filter finds no "#### n" in a tiny model's text: "[invalid]", right where that is the target
    docs = [
        {"question": f"Q{i}: what is {i} times 2?", "target": "[invalid]" if i % 2 else str(2 * i)} for i in range(5)
    ]
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "tiny_gen.yaml").write_text(GEN.format(data=d / "gen.jsonl"))
    (d / "tiny_group.yaml").write_text(GROUP)
    return d


def test_numbers_equal_a_direct_simple_evaluate(tiny, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = ("tiny_group", "tiny_gen")
    out = eval_tasks.lm_eval(
        tiny, tasks=names, include_path=str(task_dir), num_fewshot=3, batch_size=4, include_defaults=False
    )
    # lm-eval itself, its default seeds, on the same in-memory model
    direct = simple_evaluate(
        model=HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, device="cpu"),
        tasks=list(names),
        num_fewshot=3,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=False,
    )
    metrics = out["metrics"]
    expected = {}
    for prefix, table in (("", direct["results"]), ("group:", direct["groups"])):
        for task, values in table.items():
            if prefix == "" and task in direct["groups"]:
                continue
            for key, value in values.items():
                if "," in key and isinstance(value, float):
                    expected[f"{prefix}{task}/{key}"] = value
    assert metrics == pytest.approx(expected)
    # both filters kept apart, with their standard errors; the strict one is right on the odd docs only
    assert metrics["tiny_gen/exact_match,strict"] == pytest.approx(0.4)
    assert metrics["tiny_gen/exact_match,loose"] != metrics["tiny_gen/exact_match,strict"]
    assert {
        "tiny_gen/exact_match_stderr,strict",
        "tiny_gen/exact_match_stderr,loose",
        "tiny_choice_a/acc_stderr,none",
    } <= set(metrics)
    assert not any("sample_len" in k or "alias" in k for k in metrics)
    # the group is a group: its aggregate under group:, its subtasks listed, not mixed into the task results
    a, b = metrics["tiny_choice_a/acc,none"], metrics["tiny_choice_b/acc,none"]
    assert metrics["group:tiny_group/acc,none"] == pytest.approx((a + b) / 2)
    assert "tiny_group/acc,none" not in metrics and set(out["group_subtasks"]["tiny_group"]) == {
        "tiny_choice_a",
        "tiny_choice_b",
    }
    assert out["n-shot"]["tiny_choice_a"] == 3


def test_seed_defaults_are_lm_evals_own():
    import inspect

    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    params = inspect.signature(eval_tasks.lm_eval).parameters
    assert params["random_seed"].default == DEFAULT_RANDOM_SEED
    for name in ("numpy_random_seed", "torch_random_seed", "fewshot_random_seed"):
        assert params[name].default == DEFAULT_OTHER_SEED


def test_options_pass_through_and_samples_land_beside_results(task_dir, tmp_path):
    from posttrain.evals.harness import make_spec, run_eval

    config = {
        "tasks": ["tiny_gen"],
        "include_path": str(task_dir),
        "include_defaults": False,
        "log_samples": True,
        "gen_kwargs": {"max_gen_toks": 2},
        "system_instruction": "Answer briefly.",
    }
    spec = make_spec(
        {"model": "tiny:llama", "tasks": {"lm_eval": config}, "cache": False, "output": str(tmp_path / "out")}
    )
    report = run_eval(spec, log=lambda *a: None)
    result = report["results"]["tiny:llama"]["lm_eval"]
    samples = json.loads((tmp_path / "out" / result["samples_file"]).read_text())
    assert result["samples_file"] == "samples/tiny_llama__lm_eval.json"
    docs = samples["tiny_gen"]  # one record per document and filter
    assert sorted((d["doc_id"], d["filter"]) for d in docs) == sorted(
        (i, f) for i in range(5) for f in ("strict", "loose")
    )
    assert all(d["arguments"][0][0].startswith("Answer briefly.") for d in docs)  # the system instruction is used
    gen_args = docs[0]["arguments"][0][1]
    assert gen_args["max_gen_toks"] == 2  # gen_kwargs override the YAML's
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "samples" not in saved["results"]["tiny:llama"]["lm_eval"]


def test_multiturn_fewshot_without_a_chat_template_is_refused_before_loading():
    from posttrain import UserError
    from posttrain.evals.harness import parse_tasks

    with pytest.raises(UserError, match="apply_chat_template"):
        parse_tasks({"lm_eval": {"tasks": ["x"], "fewshot_as_multiturn": True}})


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(task_dir, tmp_path, run_env):
    root = Path(__file__).resolve().parents[2]
    bin_dir = root / ".venv" / "bin"
    config = json.dumps(
        {
            "lm_eval": {
                "tasks": ["tiny_group", "tiny_gen"],
                "include_path": str(task_dir),
                "include_defaults": False,
                "num_fewshot": 3,
                "batch_size": 2,
            }
        }
    )
    args = ["eval", "--model", "tiny:llama", "--task_config", config, "--no_cache"]
    one = subprocess.run(
        [str(bin_dir / "posttrain"), *args, "--output", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=root,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            str(bin_dir / "accelerate"),
            "launch",
            "--config_file",
            str(root / "accelerate_configs" / "cpu_2proc.yaml"),
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
        cwd=root,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # the work is split: lm-eval's progress bar (rank 0) counts half the requests (5 generations -> 3 with padding)
    counts = [dict(re.findall(r"Running (\w+) requests: 100%\|[^|]*\| (\d+)/", p.stderr)) for p in (one, two)]
    assert counts[0] == {"loglikelihood": "48", "generate_until": "5"}
    assert counts[1] == {"loglikelihood": "24", "generate_until": "3"}
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["processes"] == 2 and a["processes"] == 1
    x, y = a["results"]["tiny:llama"]["lm_eval"]["metrics"], b["results"]["tiny:llama"]["lm_eval"]["metrics"]
    assert x.keys() == y.keys() and len(x) == 10
    for key in x:
        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
