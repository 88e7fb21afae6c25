"""OptiBench (``posttrain.evals.optibench``): the pure pieces on worked examples and random inputs, the shipped
problems against an independent solve, the mock-model experiment planned for this task (oracle 100 % / 100 %,
syntax errors 0 % / 0 %, a wrong constraint passes the code but scores 0 %, a 5 s sleep is a timeout within
3.5 s), hostile programs as per-problem statuses, and the task end to end through ``posttrain eval``."""

import itertools
import json
import random
import re
import time

import pytest
from scipy.optimize import linprog

from posttrain import UserError
from posttrain.evals.optibench import (
    TYPES,
    boxed_value,
    extract_code,
    first_answer,
    is_correct,
    load_problems,
    run_optibench,
    score,
    stdout_values,
)

PROBLEMS = load_problems()


# ------------------------------------------------------------------------------------------ pure pieces


def test_boxed_value_reads_the_last_number_of_the_first_box():
    assert boxed_value(" \\boxed{27.00000}") == 27.0
    assert boxed_value("The answer is \\boxed{$1,250.50000} dollars") == 1250.5
    assert boxed_value("x = 3 so \\boxed{x = -0.23334} and \\boxed{9}") == -0.23334
    assert boxed_value("\\boxed{3/4}") == 0.75
    assert boxed_value("no box: 3 then 4.5") == 4.5
    assert boxed_value("nothing here") is None and boxed_value("\\boxed{}") is None
    # the answer ends where the official generation stops, at the first "* " (the start of the next key's line)
    assert boxed_value(first_answer(" 27.00000\n* Amount in bonds: 3.20000\n")) == 27.0
    assert first_answer(" 2*2*3 = 12") == " 2*2*3 = 12"


def test_extract_code_takes_the_first_python_block_or_the_whole_reply():
    assert extract_code("Here:\n```python\nprint(1)\n```\nand ```python\nprint(2)\n```") == "print(1)\n"
    assert extract_code("print(3)") == "print(3)"


def test_stdout_values_reads_key_lines():
    out = (
        "----------\nNumber of chairs: 24.0\nMaximum profit:  2200\nmaximum PROFIT : 2201.5\n"
        "Number of $1 price reductions: 1.0\n"
    )
    assert stdout_values(out, ["Number of chairs", "Maximum profit", "Number of $1 price reductions", "Missing"]) == {
        "Number of chairs": 24.0,
        "Maximum profit": 2201.5,
        "Number of $1 price reductions": 1.0,
        "Missing": None,
    }


def test_is_correct_needs_every_key_within_the_absolute_tolerance():
    truth = {"a": "10.0", "b": "-2.5"}
    assert is_correct({"a": 10.0 + 0.99e-4, "b": -2.5}, truth)
    assert not is_correct({"a": 10.0 + 1.01e-4, "b": -2.5}, truth)
    assert not is_correct({"a": 10.0}, truth) and not is_correct({"a": 10.0, "b": None}, truth)
    rng = random.Random()
    for _ in range(200):
        gt = {f"k{i}": str(rng.uniform(-1e3, 1e3)) for i in range(rng.randint(1, 4))}
        errors = {k: rng.choice([0.0, 5e-5, 2e-4, 1.0]) * rng.choice([-1, 1]) for k in gt}
        pred = {k: float(v) + errors[k] for k, v in gt.items()}
        assert is_correct(pred, gt) == all(abs(e) < 1e-4 for e in errors.values())


def test_score_against_a_direct_count():
    rng = random.Random()
    records = [
        {
            "type": rng.choice(TYPES[:3]),
            "correct": rng.random() < 0.4,
            "code_passed": rng.random() < 0.7,
            "seconds": rng.uniform(0.1, 2),
        }
        for _ in range(50)
    ]
    m = score(records)
    assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 50)
    for t in TYPES[:3]:
        rs = [r for r in records if r["type"] == t]
        assert m[f"accuracy/{t}"] == pytest.approx(sum(r["correct"] for r in rs) / len(rs))
    assert f"accuracy/{TYPES[3]}" not in m and m["problems"] == 50
    assert m["code_pass_rate"] == pytest.approx(sum(r["code_passed"] for r in records) / 50)
    ran = [r["seconds"] for r in records if r["code_passed"]]
    assert m["mean_solve_time"] == pytest.approx(sum(ran) / len(ran))


# ------------------------------------------------------------------------------------- shipped problems


def _independent_answers() -> dict[int, dict[str, float]]:
    """Each shipped problem solved again here, by enumeration or scipy's LP solver, not by its reference code."""
    out = {}
    best = max(
        (45 * x + 80 * y, x, y)
        for x in range(81)
        for y in range(21)
        if 5 * x + 20 * y <= 400 and 10 * x + 15 * y <= 450
    )
    out[0] = {"Number of chairs": best[1], "Number of tables": best[2], "Maximum profit": best[0]}
    out[1] = {"Minimum cost": linprog([2, 3], A_ub=[[-3, -2], [-1, -4]], b_ub=[-12, -8]).fun}
    lp = linprog([-0.05, -0.08], A_eq=[[1, 1]], b_eq=[10000], bounds=[(2000, None), (0, 6000)])
    out[2] = {"Amount in stocks": lp.x[1], "Maximum annual return": -lp.fun}
    best = max((7 * x + 5 * y, x, y) for x in range(8) for y in range(21) if 3 * x + y <= 20 and 2 * x + 3 * y <= 24)
    out[3] = {"Number of cakes": best[1], "Number of cookie batches": best[2], "Maximum earnings": best[0]}
    lp = linprog(
        [4, 6, 9, 5, 3, 7],
        A_ub=[[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]],
        b_ub=[50, 60],
        A_eq=[[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1]],
        b_eq=[30, 40, 40],
    )
    out[4] = {"Minimum total transportation cost": lp.fun}
    out[5] = {"Maximum profit": -linprog([-30, -40, -50], A_ub=[[2, 1, 3], [1, 3, 2]], b_ub=[100, 90]).fun}
    times = [[0, 8, 15, 20, 25], [8, 0, 9, 18, 22], [15, 9, 0, 7, 16], [20, 18, 7, 0, 6], [25, 22, 16, 6, 0]]
    out[6] = {
        "Minimum number of fire stations": min(
            sum(s)
            for s in itertools.product([0, 1], repeat=5)
            if all(any(s[i] and times[i][j] <= 10 for i in range(5)) for j in range(5))
        )
    }
    best = max((x * (30 - 2 * x) ** 2, x) for x in range(1, 15))
    out[7] = {"Side of the cut squares": best[1], "Maximum volume": best[0]}
    best = max(((20 - d - 8) * (300 + 30 * d), d) for d in range(20))
    out[8] = {"Number of $1 price reductions": best[1], "Maximum profit": best[0]}
    best = max((L * W, L, W) for L in range(101) for W in range(51) if L + 2 * W <= 100)
    out[9] = {"Length": best[1], "Width": best[2], "Maximum area": best[0]}
    rev = [[0, 10, 18, 24, 28], [0, 7, 13, 18, 21], [0, 8, 15, 20, 23]]
    out[10] = {
        "Maximum total revenue (thousand dollars)": max(
            rev[0][a] + rev[1][b] + rev[2][c] for a, b, c in itertools.product(range(5), repeat=3) if a + b + c <= 6
        )
    }
    A, B = {10: 60, 12: 50, 14: 38, 16: 25}, {20: 45, 24: 36, 28: 28, 32: 18}
    best = max((a * A[a] + b * B[b], a, b) for a in A for b in B if A[a] + B[b] <= 80)
    out[11] = {"Price of product A": best[1], "Price of product B": best[2], "Maximum revenue": best[0]}
    return out


def test_shipped_problems_follow_the_schema_and_match_an_independent_solve():
    assert len(PROBLEMS) >= 10 and {p["type"] for p in PROBLEMS} == set(TYPES)
    assert [p["index"] for p in PROBLEMS] == list(range(len(PROBLEMS)))
    for p in PROBLEMS:
        assert p["length"] == len(p["question"]) and p["var_num"] >= 1 and "import pulp" in p["code"]
        assert ("|---" in p["question"]) == p["type"].endswith("-table"), p["index"]
    answers = _independent_answers()
    for p in PROBLEMS:
        assert set(p["results"]) == set(answers[p["index"]]), p["index"]
        assert is_correct(answers[p["index"]], p["results"]), (p["index"], answers[p["index"]], p["results"])


# --------------------------------------------------------------------------- the mock-model experiment

CODES = {p["question"]: p["code"] for p in PROBLEMS}


def _question(dialog) -> str:
    return next(q for q in CODES if dialog[-1]["content"].startswith(q))


def oracle(dialogs):
    return [f"Here is the program:\n```python\n{CODES[_question(d)]}```\nDone." for d in dialogs]


def reader(items):
    """A scripted second turn: reads '<key>: <value>' off the code output it was shown, answers in a box."""
    replies = []
    for dialog, key in items:
        output = re.search(r"```code_output\n(.*)\n```", dialog[-1]["content"], re.DOTALL).group(1)
        value = re.findall(rf"^{re.escape(key)}:\s*(\S+)", output, re.MULTILINE)[-1]
        replies.append(f" \\boxed{{{float(value):.5f}}}")
    return replies


def test_oracle_model_scores_100_percent_in_both_extraction_modes():
    for extraction in ("llm", "stdout"):
        metrics, records = run_optibench(PROBLEMS, oracle, reader, extraction=extraction, batch_size=4)
        assert metrics["accuracy"] == 1.0 and metrics["code_pass_rate"] == 1.0, [r for r in records if not r["correct"]]
        assert {f"accuracy/{t}" for t in TYPES} <= set(metrics) and all(metrics[f"accuracy/{t}"] == 1.0 for t in TYPES)
        assert 0 < metrics["mean_solve_time"] < 3 and metrics["problems"] == len(PROBLEMS)
        assert all(r["status"] == "ok" for r in records)


def test_the_second_turn_shows_the_program_and_its_output_and_its_answer_decides():
    seen = []

    def wrong_reader(items):
        seen.extend(items)
        return [" -1.00000\n* Next: 7"] * len(items)  # no box: the last number before the stop string

    metrics, records = run_optibench(PROBLEMS[:2], oracle, wrong_reader)
    assert metrics["code_pass_rate"] == 1.0 and metrics["accuracy"] == 0.0
    assert [key for _, key in seen] == [*PROBLEMS[0]["results"], *PROBLEMS[1]["results"]]
    dialog = seen[0][0]
    assert [m["role"] for m in dialog] == ["system", "user", "assistant", "user"]
    assert "pulp" in dialog[0]["content"] and dialog[1]["content"].startswith(PROBLEMS[0]["question"])
    assert dialog[2]["content"] == oracle([dialog[:2]])[0]
    assert "Number of chairs: 24.0" in dialog[3]["content"] and "\\boxed{}" in dialog[3]["content"]
    assert records[0]["predicted"] == {k: -1.0 for k in PROBLEMS[0]["results"]}


def test_syntax_error_model_scores_0_percent():
    metrics, records = run_optibench(PROBLEMS, lambda ds: ["```python\ndef solve(:\n    return\n```"] * len(ds), reader)
    assert metrics["accuracy"] == 0.0 and metrics["code_pass_rate"] == 0.0
    assert all(metrics[f"accuracy/{t}"] == 0.0 for t in TYPES)
    assert all(r["status"] == "error" and r["error"].startswith("SyntaxError") for r in records)


# one binding constraint (or the domain of a choice) changed per problem: the program still runs to an optimum
WRONG = {
    0: ("<= 400  # wood", "<= 300  # wood"),
    1: (">= 12  # protein", ">= 20  # protein"),
    2: ("stocks <= 0.6 * 10000", "stocks <= 0.5 * 10000"),
    3: ("<= 20  # eggs", "<= 15  # eggs"),
    4: ("== demand[s]", "== demand[s] - 5"),
    5: ("<= 100", "<= 80"),
    6: ("<= 10", "<= 7"),
    7: ("range(1, 15)", "range(1, 5)"),
    8: ("range(0, 13)", "range(2, 13)"),
    9: ("range(0, 51)", "range(0, 21)"),
    10: ("<= 6", "<= 5"),
    11: ("<= 80", "<= 70"),
}


def test_wrong_constraint_model_passes_the_code_but_scores_0_percent():
    index = {p["question"]: p["index"] for p in PROBLEMS}

    def wrong(dialogs):
        replies = []
        for d in dialogs:
            q = _question(d)
            old, new = WRONG[index[q]]
            assert CODES[q].count(old) == 1, (index[q], old)
            replies.append(f"```python\n{CODES[q].replace(old, new)}```")
        return replies

    for extraction in ("llm", "stdout"):
        metrics, records = run_optibench(PROBLEMS, wrong, reader, extraction=extraction)
        assert metrics["code_pass_rate"] == 1.0 and metrics["accuracy"] == 0.0, records
        assert all(r["status"] == "ok" for r in records)


def test_a_sleeping_program_is_a_timeout_within_3_5_seconds():
    start = time.monotonic()
    metrics, records = run_optibench(PROBLEMS[:1], lambda ds: ["```python\nimport time\ntime.sleep(5)\n```"], reader)
    assert time.monotonic() - start < 3.5
    assert records[0]["status"] == "timeout" and records[0]["seconds"] < 3.5
    assert metrics["accuracy"] == 0.0 and metrics["code_pass_rate"] == 0.0


def test_hostile_programs_each_get_a_status_and_the_rest_is_scored(tmp_path):
    hostile = {
        0: "import time\ntime.sleep(60)",
        1: "x = []\nwhile True:\n    x.append(bytearray(64 << 20))",
        2: f"open({str(tmp_path / 'escaped.txt')!r}, 'w').write('x')",
        3: "import os\nwhile True:\n    os.fork()",
        4: "print('The problem could not be solved to optimality.')",
    }
    expected = {0: {"timeout"}, 1: {"memory_limit"}, 2: {"denied"}, 3: {"process_limit", "timeout"}, 4: {"not_optimal"}}
    index = {p["question"]: p["index"] for p in PROBLEMS}

    def model(dialogs):
        return [f"```python\n{hostile.get(index[_question(d)], CODES[_question(d)])}\n```" for d in dialogs]

    metrics, records = run_optibench(PROBLEMS[:7], model, reader, timeout=3.0, memory_mb=512)
    for r in records:
        assert r["status"] in expected.get(r["index"], {"ok"}), r
        assert r["correct"] == (r["index"] >= 5)
    assert not (tmp_path / "escaped.txt").exists()
    assert metrics["accuracy"] == pytest.approx(2 / 7) and metrics["code_pass_rate"] == pytest.approx(3 / 7)


# ------------------------------------------------------------------------------ data file and harness


def test_path_loads_a_file_in_the_official_schema_and_bad_files_are_refused_early(tmp_path):
    from posttrain.evals.harness import make_spec

    official_like = [
        {
            "question": "q",
            "results": {"The maximum profit you can get": "3600.0"},
            "type": "linear-notable",
            "index": 0,
            "length": 1,
            "var_num": 1,
            "code": "from pyscipopt import Model",
            "scenario": "s",
        }
    ]
    good = tmp_path / "e-opt.json"
    good.write_text(json.dumps(official_like))
    assert load_problems(str(good)) == official_like
    spec = make_spec({"model": "tiny:llama", "tasks": {"optibench": {"path": str(good), "extraction": "stdout"}}})
    assert spec.tasks["optibench"]["path"] == str(good)
    bad = tmp_path / "bad.json"
    for content, message in [
        (None, "does not exist"),
        ("[{", "is not JSON"),
        ("[]", "non-empty JSON list"),
        (json.dumps([{**official_like[0], "type": "quadratic"}]), "'type' is 'quadratic'"),
        (json.dumps([{**official_like[0], "results": {"x": "many"}}]), "is not a number"),
    ]:
        if content is not None:
            bad.write_text(content)
        with pytest.raises(UserError, match=re.escape(message)):
            make_spec({"model": "tiny:llama", "tasks": {"optibench": {"path": str(bad)}}})
    for options, message in [
        ({"solver": "gurobi"}, "expects"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"extraction": "regex"}, "expects"),
    ]:
        with pytest.raises(UserError, match=message):
            make_spec({"model": "tiny:llama", "tasks": {"optibench": options}})


def test_posttrain_eval_runs_the_task_on_a_tiny_model(tmp_path):
    from posttrain.evals.harness import make_spec, run_eval

    spec = make_spec(
        {
            "model": "tiny:llama",
            "tasks": {"optibench": {"max_new_tokens": 24, "answer_max_new_tokens": 8}},
            "limit": 4,
            "batch_size": 2,
            "output": str(tmp_path / "eval"),
            "cache": False,
        }
    )
    report = run_eval(spec, log=lambda *_: None)
    out = report["results"]["tiny:llama"]["optibench"]
    m = out["metrics"]
    assert m["problems"] == 4 and 0 <= m["accuracy"] <= m["code_pass_rate"] <= 1
    assert {"accuracy/linear-notable", "code_pass_rate", "mean_solve_time"} <= set(m)
    assert len(out["problems"]) == 4 and sum(out["statuses"].values()) == 4
    assert (tmp_path / "eval" / "results.md").read_text().count("| optibench |") == len(m)
