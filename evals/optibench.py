"""OptiBench (E-OPT): can the model write solver code for a word problem and read the answer off its output?

Paper: Z. Yang et al., "OptiBench Meets ReSocratic: Measure and Improve LLMs for Optimization Modeling",
ICLR 2025, arXiv 2407.09887. Official code and data: github.com/yangzhch6/ReSocratic (``eval_sft_code.py``,
``utils.py``, ``data/e-opt.json``; no licence seen, so neither is copied here and the data file is read from
a ``path`` the user gives, never shipped).

**Data.** A JSON list; each problem has ``question`` (text), ``results`` ({quantity name: value string}),
``type`` in ``TYPES`` (linear / nonlinear, without / with a table), and in the official file also ``index``,
``length``, ``var_num``, a reference ``code`` and sometimes ``scenario`` / ``formulation``. Without ``path``
the task runs the 12 problems of ``optibench_problems.json`` beside this file, written for this project in the
same schema (small LPs, MILPs, a set cover and four integer nonlinear problems whose reference code linearises
them with one binary variable per candidate value), every answer checked against an independent solve.

**Protocol** (the official evaluation, two turns, greedy):
1. system "Please use python code with <solver> to solve the given optimization question.", user: the question
   and a code template (``prompt: zeroshot``) or a worked example first (``fewshot``); the first fenced
   ```` ```python ```` block of the reply is the program, else the whole reply.
2. The program runs in a sandbox (``posttrain.evals.sandbox``: subprocess, ``timeout`` 3 s as in the official
   code, temporary folder, rlimits, scrubbed environment). A failure, a timeout, or the output "The problem
   could not be solved to optimality" is wrong. ``code_pass_rate`` counts the programs that ran.
3. For each key of ``results``, the dialog continues with the code output and the request for the value as
   ``\\boxed{}`` rounded to 5 decimals, and the model's answer is started with "* <key>:".
4. The answer ends at the first "* " (the official stop string); the number inside its first ``\\boxed{}`` is
   read (its last number; the whole answer's last number when there is no box). A
   problem is correct iff every key has ``|pred - gt| < tol`` (1e-4, absolute).

**Deviations, all options.** ``solver: pulp`` (default: PuLP's wheel ships CBC, so it runs offline; the official
prompt names pyscipopt, ``solver: pyscipopt`` asks for it where it is installed). ``extraction: stdout`` skips
the second turn and reads "<key>: <number>" lines of the output (deterministic; for model-free checks). The
prompts' wording and the few-shot example are written here (the official template files are not copied).
Metrics: ``accuracy``, ``accuracy/<type>``, ``code_pass_rate``, ``mean_solve_time`` (wall seconds of the
programs that ran), ``problems``; per problem: sandbox status, predictions and correctness in ``problems``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Callable, Literal

from posttrain.evals.common import generate, mean, render
from posttrain.evals.sandbox import run_python

TYPES = ("linear-notable", "linear-table", "nonlinear-notable", "nonlinear-table")
NOT_OPTIMAL = "The problem could not be solved to optimality"
SHIPPED = Path(__file__).with_name("optibench_problems.json")

# ------------------------------------------------------------------------------------------------ data


def load_problems(path: str | None = None) -> list[dict]:
    """The problems of ``path`` (the official ``e-opt.json`` or any file in its schema), or the shipped set;
    checked: one clear error naming the problem and the field."""
    file = Path(path).expanduser() if path else SHIPPED
    fix = "give the E-OPT file (data/e-opt.json of github.com/yangzhch6/ReSocratic) or a JSON list in its schema"
    try:
        problems = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"optibench path {file} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"optibench path {file} cannot be read ({err}); {fix}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"optibench path {file} is not JSON ({err.msg}, line {err.lineno}); {fix}") from None
    if not isinstance(problems, list) or not problems:
        raise ValueError(f"optibench path {file}: expected a non-empty JSON list of problems; {fix}")
    for i, p in enumerate(problems):
        where = f"optibench path {file}, problem {i}"
        if not isinstance(p, dict):
            raise ValueError(f"{where}: expected an object with question, results and type; got {type(p).__name__}")
        if not isinstance(p.get("question"), str) or not p["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if p.get("type") not in TYPES:
            raise ValueError(f"{where}: 'type' is {p.get('type')!r}; valid: {', '.join(TYPES)}")
        results = p.get("results")
        if not isinstance(results, dict) or not results:
            raise ValueError(f"{where}: 'results' must be a non-empty mapping quantity -> value")
        for key, value in results.items():
            if _number(value) is None:
                raise ValueError(f"{where}: results[{key!r}] = {value!r} is not a number")
    return problems


def _number(value) -> float | None:
    """A results value ("3600.0", 12, "3/4") as a float; None if it is none. The official code eval()s it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?:\s*/\s*(\d+(?:\.\d*)?))?\s*", str(value))
    if not match:
        return None
    num = float(match.group(1))
    return num / float(match.group(2)) if match.group(2) and float(match.group(2)) else num


# ---------------------------------------------------------------------------------------- pure pieces

_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+(?:\.\d+)?)?"


def extract_code(reply: str) -> str:
    """The first ```python block of a reply, else the whole reply (as the official ``match_response_code``)."""
    match = re.search(r"```python\s*\n(.*?)```", reply, re.DOTALL)
    return match.group(1) if match else reply


def boxed_value(text: str) -> float | None:
    """The answer of a second-turn reply: the last number inside the first ``\\boxed{...}``, else the last number
    of the text ("$" and thousands commas dropped); None when there is no number."""
    match = re.search(r"boxed\{(.*?)\}", text)
    span = (match.group(1) if match else text).replace("$", "").replace(",", "")
    numbers = re.findall(_NUMBER, span)
    return _number(numbers[-1]) if numbers else None


def first_answer(reply: str) -> str:
    """The second-turn reply up to the first "* ": the official generation stops there (``stop=["* ", ...]``), before
    the model starts on the next "* <key>:" line; cutting afterwards gives the same text for greedy decoding."""
    return reply.split("* ", 1)[0]


def stdout_values(output: str, keys) -> dict[str, float | None]:
    """``extraction: stdout``: for each key, the first number after "<key>:" on the last line that starts with it
    (case and surrounding spaces ignored)."""
    values = {}
    for key in keys:
        found = re.findall(rf"^\s*{re.escape(key.strip())}\s*:\s*({_NUMBER})", output, re.MULTILINE | re.IGNORECASE)
        values[key] = _number(found[-1]) if found else None
    return values


def is_correct(predicted: dict, results: dict, tol: float = 1e-4) -> bool:
    """Every key of ``results`` predicted within ``tol`` (absolute)."""
    for key, truth in results.items():
        value = predicted.get(key)
        if value is None or not math.isfinite(value) or not abs(value - _number(truth)) < tol:
            return False
    return True


def score(records: list[dict]) -> dict[str, float]:
    """accuracy, accuracy per type (types present), code pass rate, mean wall seconds of the programs that ran."""
    metrics = {"accuracy": mean(r["correct"] for r in records)}
    for t in TYPES:
        of_type = [r["correct"] for r in records if r["type"] == t]
        if of_type:
            metrics[f"accuracy/{t}"] = mean(of_type)
    metrics["code_pass_rate"] = mean(r["code_passed"] for r in records)
    metrics["mean_solve_time"] = mean(r["seconds"] for r in records if r["code_passed"])
    metrics["problems"] = float(len(records))
    return metrics


# -------------------------------------------------------------------------------------------- prompts

_SYSTEM = "Please use python code with {solver} to solve the given optimization question."
_TEMPLATES = {
    "pulp": """Write one complete Python program that models the question with PuLP and solves it with CBC:
```python
import pulp

prob = pulp.LpProblem("name", pulp.LpMaximize)  # or pulp.LpMinimize
# decision variables: pulp.LpVariable(name, lowBound=0, cat="Continuous" | "Integer" | "Binary")
# objective: prob += <linear expression>   (a nonlinear one over a few integer values: one binary per value)
# constraints: prob += <expression> <= | >= | == <number>
status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
if pulp.LpStatus[status] != "Optimal":
    print("The problem could not be solved to optimality.")
else:
    # print each quantity the question asks for as "<quantity>: <value>"
    print("Maximum profit:", pulp.value(prob.objective))
```
Answer with the program only, in a ```python block.""",
    "pyscipopt": """Write one complete Python program that models the question with pyscipopt and solves it:
```python
from pyscipopt import Model

model = Model()
# decision variables: model.addVar(name, vtype="CONTINUOUS" | "INTEGER" | "BINARY", lb=0)
# objective: obj = model.addVar("obj"); model.addCons(obj == <expression>); model.setObjective(obj, "maximize")
# constraints: model.addCons(<expression> <= <number>)
model.optimize()
if model.getStatus() != "optimal":
    print("The problem could not be solved to optimality.")
else:
    # print each quantity the question asks for as "<quantity>: <value>"
    print("Maximum profit:", model.getObjVal())
```
Answer with the program only, in a ```python block.""",
}
_EXAMPLE_QUESTION = (
    "A company makes two products. Product X earns $3 per unit and needs 1 hour of assembly; product Y "
    "earns $5 per unit and needs 2 hours. There are 40 assembly hours, and at most 15 units of Y can be "
    "sold. How many units of each (whole numbers) maximise the profit, and what is the maximum profit?"
)
_EXAMPLE_CODE = {
    "pulp": """```python
import pulp

prob = pulp.LpProblem("products", pulp.LpMaximize)
x = pulp.LpVariable("x", lowBound=0, cat="Integer")
y = pulp.LpVariable("y", lowBound=0, upBound=15, cat="Integer")
prob += 3 * x + 5 * y
prob += x + 2 * y <= 40
status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
if pulp.LpStatus[status] != "Optimal":
    print("The problem could not be solved to optimality.")
else:
    print("Units of X:", x.value())
    print("Units of Y:", y.value())
    print("Maximum profit:", pulp.value(prob.objective))
```""",
    "pyscipopt": """```python
from pyscipopt import Model

model = Model()
x = model.addVar("x", vtype="INTEGER", lb=0)
y = model.addVar("y", vtype="INTEGER", lb=0, ub=15)
obj = model.addVar("obj")
model.addCons(obj == 3 * x + 5 * y)
model.setObjective(obj, "maximize")
model.addCons(x + 2 * y <= 40)
model.optimize()
if model.getStatus() != "optimal":
    print("The problem could not be solved to optimality.")
else:
    print("Units of X:", model.getVal(x))
    print("Units of Y:", model.getVal(y))
    print("Maximum profit:", model.getObjVal())
```""",
}
_ANSWER = (
    "According to the code output, give your final answer for the following quantity. Put it in \\boxed{}, "
    "as a number only, rounded to 5 decimal places, such as \\boxed{27.00000}, \\boxed{3.20000} or "
    "\\boxed{0.23334}."
)


def code_dialog(question: str, solver: str = "pulp", prompt: str = "zeroshot") -> list[dict]:
    """The first turn: system and user messages asking for a solver program."""
    messages = [{"role": "system", "content": _SYSTEM.format(solver=solver)}]
    template = _TEMPLATES[solver]
    if prompt == "fewshot":
        template = f"{template}\n\nExample question: {_EXAMPLE_QUESTION}\nExample answer:\n{_EXAMPLE_CODE[solver]}"
    return messages + [{"role": "user", "content": f"{question}\n\n{template}"}]


def answer_dialog(first: list[dict], reply: str, output: str) -> list[dict]:
    """The second turn: the first dialog, the model's program and its output; the caller appends "* <key>:"."""
    return first + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"```code_output\n{output}\n```\n\n\n{_ANSWER}"},
    ]


# -------------------------------------------------------------------------------------------- running


def run_optibench(
    problems: list[dict],
    write_code: Callable[[list], list[str]],
    read_values: Callable[[list], list[str]] | None,
    *,
    solver: str = "pulp",
    prompt: str = "zeroshot",
    extraction: str = "llm",
    timeout: float = 3.0,
    tol: float = 1e-4,
    memory_mb: int = 2048,
    map_batches: Callable | None = None,
    batch_size: int = 8,
) -> tuple[dict, list[dict]]:
    """(metrics, per-problem records). ``write_code(dialogs) -> replies`` is the first turn; ``read_values(
    [(dialog, key), ...]) -> replies`` the second (unused with ``extraction: stdout``). ``map_batches(items, fn)``
    spreads batches over processes (``EvalContext.map_batches``); default: one process."""
    if map_batches is None:

        def map_batches(items, fn):
            return [r for b in range(0, len(items), batch_size) for r in fn(list(items[b : b + batch_size]), b)]

    def run(batch: list[dict], _index: int) -> list[dict]:
        dialogs = [code_dialog(p["question"], solver, prompt) for p in batch]
        replies = write_code(dialogs)
        records, pending = [], []
        for p, dialog, reply in zip(batch, dialogs, replies):
            code = extract_code(reply)
            run_ = run_python(code, timeout=timeout, memory_mb=memory_mb)
            output = run_.stdout
            record = {
                "index": p.get("index"),
                "type": p["type"],
                "status": run_.status,
                "code_passed": run_.ok,
                "seconds": run_.seconds,
                "error": run_.error,
                "predicted": {},
                "correct": False,
                "code": code[:4000],
                "output": output[-2000:],
            }
            if run_.ok and NOT_OPTIMAL in output:
                record["status"], record["error"] = "not_optimal", "the program found no optimal solution"
            elif run_.ok:
                if extraction == "stdout":
                    record["predicted"] = stdout_values(output, p["results"])
                else:
                    follow = answer_dialog(dialog, reply, output)
                    pending += [(record, key, (follow, key)) for key in p["results"]]
            records.append(record)
        if pending:
            answers = []
            for start in range(0, len(pending), batch_size):
                answers += read_values([item for _, _, item in pending[start : start + batch_size]])
            for (record, key, _), text in zip(pending, answers):
                text = first_answer(text)
                record["predicted"][key] = boxed_value(text)
                record.setdefault("answers", {})[key] = text[:200]
        for p, record in zip(batch, records):
            if record["status"] == "ok":
                record["correct"] = is_correct(record["predicted"], p["results"], tol)
        return records

    records = map_batches(problems, run)
    return score(records), records


def check_optibench(path: str | None, solver: str, timeout: float, tol: float, memory_mb: int, **_) -> None:
    """What would fail only after the model loaded: the data file, the solver package, the limits."""
    load_problems(path)
    if importlib.util.find_spec(solver) is None:
        raise ValueError(
            f"solver {solver!r} is not installed; pip install {solver}, or use solver: pulp (a dependency of posttrain)"
        )
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds (got {timeout}); the official evaluation uses 3")
    if not tol > 0:
        raise ValueError(f"tol must be > 0 (got {tol}); the official evaluation uses 1e-4")
    if memory_mb < 256:
        raise ValueError(f"memory_mb must be >= 256 (got {memory_mb}): Python and the solver need that much to start")


def optibench(
    ctx,
    path: str | None = None,
    solver: Literal["pulp", "pyscipopt"] = "pulp",
    prompt: Literal["zeroshot", "fewshot"] = "zeroshot",
    extraction: Literal["llm", "stdout"] = "llm",
    timeout: float = 3.0,
    tol: float = 1e-4,
    memory_mb: int = 2048,
    max_new_tokens: int = 512,
    answer_max_new_tokens: int = 24,
):
    """The eval task (``posttrain eval --tasks optibench``): the model writes solver code, it runs sandboxed, the
    model reads the values off its output. ``path``: the E-OPT JSON file (default: the 12 shipped problems)."""
    check_optibench(path=path, solver=solver, timeout=timeout, tol=tol, memory_mb=memory_mb)
    problems = load_problems(path)
    if ctx.limit:
        problems = problems[: ctx.limit]

    def write_code(dialogs):
        return [g[0] for g in generate(ctx.model, ctx.tokenizer, dialogs, max_new_tokens=max_new_tokens)]

    def read_values(items):
        texts = [render(ctx.tokenizer, dialog)[0] + f"* {key}:" for dialog, key in items]
        return [g[0] for g in generate(ctx.model, ctx.tokenizer, texts, max_new_tokens=answer_max_new_tokens)]

    metrics, records = run_optibench(
        problems,
        write_code,
        read_values,
        solver=solver,
        prompt=prompt,
        extraction=extraction,
        timeout=timeout,
        tol=tol,
        memory_mb=memory_mb,
        map_batches=ctx.map_batches,
        batch_size=ctx.batch_size,
    )
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"metrics": metrics, "statuses": statuses, "problems": records}
