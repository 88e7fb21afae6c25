import math
import random

import pytest

from posttrain.evals.arithmetic import evaluate_verifiable, pass_at_k


def test_pass_at_k_matches_the_combinatorial_definition():
    rng = random.Random()
    for _ in range(20):
        n = rng.randint(1, 12)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 2, 1) == pytest.approx(0.25)


def test_evaluate_verifiable_on_a_tiny_model():
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    from posttrain.data import DataArguments, load_task_datasets
    from posttrain.recipes.models import load_tokenizer
    from posttrain.recipes.tiny import tiny_model_path

    data = load_task_datasets("prompt", DataArguments(dataset="builtin:arithmetic", num_samples=6, difficulty=1))[
        "train"
    ]
    path = str(tiny_model_path("llama"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=path))
    results = evaluate_verifiable(model, tokenizer, data, k_values=(1, 2), num_samples=2, max_new_tokens=8)
    assert set(results) == {"greedy_accuracy", "pass@1", "pass@2"}
    assert all(0.0 <= v <= 1.0 for v in results.values()) and results["pass@2"] >= results["pass@1"]
