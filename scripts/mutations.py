"""Wiring mutations of the five research trainers: apply each alone, run the tests that own it, report survivors.

    .venv/bin/python scripts/mutations.py                 # every mutation, each against its selected tests
    .venv/bin/python scripts/mutations.py --full          # each against its method's whole test file (slow tests too)
    .venv/bin/python scripts/mutations.py thr_ sparsepo_  # the mutations whose id starts with one of these

A developer's tool, not part of ``make test``: a mutation is a plausible bug in the trainer classes (the code around
the pure math: which model's hidden states, which positions, which rows, which rank, when a hook fires). Each is a
literal text replacement in one file, applied, tested, and reverted (also on Ctrl-C). A mutation is *killed* when
the tests fail on it and pass on the unmutated code (checked first, once per test selection); a *survivor* names a
wiring the tests do not pin. The selected tests (``-k``) are the ones written to pin that wiring, so the default run
takes minutes, not the hour the whole files take on two cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: str  # the owning test file
    select: str  # pytest -k expression of the tests that should kill it
    what: str


SPARSEPO, THR, CRLHF = (
    "tests/trainers/test_sparsepo.py",
    "tests/trainers/test_thr_grpo.py",
    "tests/trainers/test_constrained_rlhf.py",
)
WAGLE, MOE = "tests/trainers/test_wagle.py", "tests/trainers/test_moe_balance.py"

MUTATIONS = [
    # --- SparsePO
    Mutation(
        "sparsepo_mask_reads_policy",
        "trainers/sparsepo.py",
        '"mask_inputs": ref_hidden_states,',
        '"mask_inputs": None if ref_hidden_states is None else '
        "[h[:, :-1] for h in model(**model_kwargs, output_hidden_states=True).hidden_states[1:]],",
        SPARSEPO,
        "reference_hidden_states",
        "the mask network reads the policy's hidden states (with gradient), not the reference's",
    ),
    Mutation(
        "sparsepo_rewards_swapped",
        "trainers/sparsepo.py",
        "chosen, rejected = rewards.chunk(2)",
        "rejected, chosen = rewards.chunk(2)",
        SPARSEPO,
        "hand_computed",
        "logged chosen / rejected rewards swapped",
    ),
    Mutation(
        "sparsepo_labels_shifted",
        "trainers/sparsepo.py",
        'labels = inputs["input_ids"][:, 1:].masked_fill(~mask, 0)',
        'labels = inputs["input_ids"][:, :-1].masked_fill(~mask, 0)',
        SPARSEPO,
        "equals_sparsepo_loss or reference_hidden_states",
        "the token at position t scored instead of t + 1",
    ),
    Mutation(
        "sparsepo_prompt_tokens_in_mask",
        "trainers/sparsepo.py",
        'mask = inputs["completion_mask"][:, 1:].bool()',
        'mask = inputs["attention_mask"][:, 1:].bool()',
        SPARSEPO,
        "equals_sparsepo_loss or reference_hidden_states",
        "prompt tokens counted in the loss",
    ),
    Mutation(
        "sparsepo_l1_halving_inverted",
        "trainers/sparsepo.py",
        "halve = cfg.mask_on_reward and cfg.mask_on_kl and not cfg.rw_kl_independent",
        "halve = cfg.mask_on_reward and cfg.mask_on_kl and cfg.rw_kl_independent",
        SPARSEPO,
        "halved",
        "the L1 coefficients halved for independent masks instead of the common one",
    ),
    # --- THR
    Mutation(
        "thr_hidden_one_late",
        "trainers/thr_grpo.py",
        'h = captured["h"][:, prompt_ids.size(1) - 1 : -1].float()',
        'h = captured["h"][:, prompt_ids.size(1) :].float()',
        THR,
        "formula_on_plain",
        "hidden states one position late ([:, P:] instead of [:, P-1:-1])",
    ),
    Mutation(
        "thr_groups_not_gathered",
        "trainers/thr_grpo.py",
        "ids, mask, hidden, lse = gather_padded(acc, completion_ids, completion_mask, hidden, lse)",
        "ids, mask, hidden, lse = completion_ids, completion_mask, hidden, lse\n"
        "        rewards = rewards.view(acc.num_processes, -1)[acc.process_index]\n"
        "        correct = correct.view(acc.num_processes, -1)[acc.process_index]",
        THR,
        "split_across",
        "each rank computes the groups of its own rows only (a group split across ranks is cut in two)",
    ),
    Mutation(
        "thr_no_temperature",
        "trainers/thr_grpo.py",
        "return postprocess_logits(logits, scale, softcap, self.temperature)",
        "return postprocess_logits(logits, scale, softcap, 1.0)",
        THR,
        "logit_postprocessing",
        "q of the old policy without the sampling temperature",
    ),
    Mutation(
        "thr_correct_strict",
        "trainers/thr_grpo.py",
        "correct = (rewards >= cfg.correct_threshold)",
        "correct = (rewards > cfg.correct_threshold)",
        THR,
        "formula_on_plain",
        "a reward equal to correct_threshold not counted as correct",
    ),
    Mutation(
        "thr_tool_mask_ignored",
        "trainers/thr_grpo.py",
        'completion_mask = out["completion_mask"] if tool_mask is None else out["completion_mask"] * tool_mask',
        'completion_mask = out["completion_mask"]',
        THR,
        "tool_tokens",
        "tool-result tokens enter V*, M+ and tau",
    ),
    # --- constrained RLHF
    Mutation(
        "crlhf_rank_local_step",
        "trainers/constrained_rlhf.py",
        'total = self.accelerator.reduce(self._step_components.to(self.accelerator.device), reduction="sum").cpu()',
        "total = self._step_components",
        CRLHF,
        "identical_on_both_ranks",
        "the multiplier step on the rank-local means",
    ),
    Mutation(
        "crlhf_step_before_mix",
        "trainers/constrained_rlhf.py",
        "lam = None if self.multipliers is None else self.multipliers.lam",
        "if self.multipliers is not None and not self._per_step_multipliers:\n"
        "            self.multipliers.step(rewards.mean(0), self.thresholds)\n"
        "        lam = None if self.multipliers is None else self.multipliers.lam",
        CRLHF,
        "before_their_step",
        "the multiplier step taken before the advantages are mixed",
    ),
    Mutation(
        "crlhf_kl_sign",
        "trainers/constrained_rlhf.py",
        "            -args.kl_coef * kl,\n            self.num_generations,",
        "            args.kl_coef * kl,\n            self.num_generations,",
        CRLHF,
        "equal_stock_rloo",
        "the KL stream rewarded instead of penalised",
    ),
    Mutation(
        "crlhf_half_batch_values",
        "trainers/constrained_rlhf.py",
        "values = rewards.mean(0)  # the constraint values",
        "values = rewards[: rewards.size(0) // 2].mean(0)  # the constraint values",
        CRLHF,
        "one_multiplier_step",
        "the constraint values from half the batch",
    ),
    Mutation(
        "crlhf_reference_is_policy",
        "trainers/constrained_rlhf.py",
        "ref = logps(reference)",
        "ref = logps(self.model)",
        CRLHF,
        "equal_stock_rloo",
        "the KL stream measured against the policy itself (always 0)",
    ),
    # --- WAGLE
    Mutation(
        "wagle_retain_position",
        "trainers/wagle.py",
        "retain = self.retain_batch((self.micro_step * world + rank) * self.args.per_device_train_batch_size)",
        "retain = self.retain_batch((self.micro_step + rank) * self.args.per_device_train_batch_size)",
        WAGLE,
        "disjoint_consecutive",
        "retain position (k + rank) B: ranks reuse each other's retain batches",
    ),
    Mutation(
        "wagle_mask_not_applied",
        "trainers/wagle.py",
        "            apply_gradient_mask(self.trainer.model, self.trainer.mask)  # the bare model",
        "            pass  # the bare model",
        WAGLE,
        "after_clipping or stay_put",
        "the mask never applied to p.grad",
    ),
    Mutation(
        "wagle_attribution_retain_is_forget",
        "trainers/wagle.py",
        "retain = [self.retain_batch(j * size) for j in range(rank, total, world)]",
        "retain = list(forget)",
        WAGLE,
        "differs_from_its_baselines or one_process_mask",
        "phase 1's retain gradients taken on the forget batches",
    ),
    Mutation(
        "wagle_retain_weight_ignored",
        "trainers/wagle.py",
        "loss = graddiff_loss(forget_ce, retain_ce, args.retain_weight)",
        "loss = graddiff_loss(forget_ce, retain_ce)",
        WAGLE,
        "plain_unlearning_step_for_step",
        "GradDiff without the retain weight lambda",
    ),
    # --- ALF-LB
    Mutation(
        "moe_update_before_optimizer_step",
        "trainers/moe_balance.py",
        "def on_step_end(self, args, state, control, **kwargs):",
        "def on_pre_optimizer_step(self, args, state, control, **kwargs):",
        MOE,
        "after_each_optimizer_step",
        "the bias update hooked before the optimizer step",
    ),
    Mutation(
        "moe_counts_not_reset",
        "trainers/moe_balance.py",
        "            self.counter.reset()\n",
        "            pass\n",
        MOE,
        "callback_in_hf_trainer or after_each_optimizer_step",
        "the loads of earlier steps kept in the counts",
    ),
    Mutation(
        "moe_rate_sign",
        "trainers/moe_balance.py",
        "            rate=self.rate,",
        "            rate=-self.rate,",
        MOE,
        "after_each_optimizer_step",
        "the bias pushed towards the overloaded experts",
    ),
    Mutation(
        "moe_step_count",
        "trainers/moe_balance.py",
        "step=max(state.global_step - 1, 0),",
        "step=state.global_step,",
        MOE,
        "after_each_optimizer_step",
        "the decaying rule's step counted from 1",
    ),
]


def pytest(mutation: Mutation, full: bool, timeout: int) -> int | None:
    """pytest's exit code on the mutation's tests (None on timeout)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mutation.tests]
    if not full:
        cmd += ["-k", mutation.select]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return None


def run(mutation: Mutation, full: bool, timeout: int, baselines: dict) -> tuple[str, float]:
    """Killed only if the same tests pass on the unmutated code (checked once per test selection)."""
    path = ROOT / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return f"not applied ({original.count(mutation.old)} matches: the code moved; update the mutation)", 0.0
    start = time.time()
    key = (mutation.tests, None if full else mutation.select)
    if key not in baselines:
        baselines[key] = pytest(mutation, full, timeout)
    if baselines[key] != 0:
        return f"baseline fails (exit {baselines[key]}): fix the tests first", time.time() - start
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        code = pytest(mutation, full, timeout)
    finally:
        path.write_text(original)
    if code is None:
        return "timeout", time.time() - start
    if code == 5:
        return "no test selected", time.time() - start
    return ("killed" if code != 0 else "SURVIVED"), time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefixes", nargs="*", help="run only the mutations whose id starts with one of these")
    parser.add_argument("--full", action="store_true", help="run each method's whole test file, slow tests too")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutation")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.prefixes or m.id.startswith(tuple(args.prefixes))]
    rows, baselines = [], {}
    for i, m in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {m.id}: {m.what} ...", end=" ", flush=True)
        result, seconds = run(m, args.full, args.timeout, baselines)
        print(f"{result} ({seconds:.0f} s)", flush=True)
        rows.append((m, result, seconds))
    print("\n| mutation | what | tests | result |\n|---|---|---|---|")
    for m, result, seconds in rows:
        where = m.tests if args.full else f"{m.tests} -k '{m.select}'"
        print(f"| {m.id} | {m.what} | {where} | {result} ({seconds:.0f} s) |")
    survivors = [m.id for m, result, _ in rows if result != "killed"]
    print(
        f"\n{len(rows) - len(survivors)} of {len(rows)} killed"
        + (f"; not killed: {', '.join(survivors)}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
