"""Verifiable-answer evaluation: greedy accuracy and pass@k on prompt/answer data (e.g. builtin:arithmetic).

Used by THR-GRPO experiments (exploitation shows in greedy accuracy, exploration in pass@k) and by the
eval harness. A completion is correct when the reward function ``numeric_match`` (the one GRPO trains on)
gives it 1. pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374):
pass@k = 1 - C(n - c, k) / C(n, k) from n samples of which c are correct.
"""

from __future__ import annotations

import math

import torch

from posttrain.trainers.rewards import numeric_match


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@torch.no_grad()
def _generate(model, tokenizer, prompts, num_return_sequences, max_new_tokens, do_sample, temperature, batch_size):
    texts = []
    tokenizer.padding_side = "left"  # generation continues from the right end
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rendered = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
            for p in chunk
        ]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def evaluate_verifiable(
    model,
    tokenizer,
    dataset,
    k_values=(1, 4),
    num_samples: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy accuracy and pass@k (k in ``k_values``, from ``num_samples`` samples per prompt) on a dataset
    with ``prompt`` and ``answer`` columns."""
    model.eval()
    prompts, answers = list(dataset["prompt"]), [str(a) for a in dataset["answer"]]
    greedy = _generate(model, tokenizer, prompts, 1, max_new_tokens, False, 1.0, batch_size)
    results = {"greedy_accuracy": sum(numeric_match(greedy, answers)) / len(answers)}
    torch.manual_seed(seed)
    sampled = _generate(model, tokenizer, prompts, num_samples, max_new_tokens, True, temperature, batch_size)
    correct = [
        sum(numeric_match(sampled[i * num_samples : (i + 1) * num_samples], [a] * num_samples))
        for i, a in enumerate(answers)
    ]
    for k in k_values:
        if k > num_samples:
            raise ValueError(f"pass@{k} needs at least {k} samples per prompt (num_samples={num_samples})")
        results[f"pass@{k}"] = sum(pass_at_k(num_samples, int(c), k) for c in correct) / len(answers)
    return results
