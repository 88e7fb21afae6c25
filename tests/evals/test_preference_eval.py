"""The preference task without a reference (raw and length-normalised log-likelihood accuracy, which one is DPO's
implicit reward, a warning) and with a reward model (scored on its own tokenizer and chat template)."""

import json
import warnings

import pytest
import torch

from posttrain.evals import tasks as eval_tasks
from posttrain.evals.common import EvalContext, eval_rows, load_checkpoint
from posttrain.evals.harness import markdown_table

torch.set_num_threads(1)


def _context(arch: str, limit=None) -> EvalContext:
    model, tokenizer, path = load_checkpoint(f"tiny:{arch}")
    return EvalContext(model, tokenizer, f"tiny:{arch}", path, limit=limit, batch_size=16)


def _logp_and_tokens(ctx, prompt, answer):
    """log pi(answer | prompt) and the answer's token count, one unpadded sequence at a time."""
    tok = ctx.tokenizer
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completion = tok.apply_chat_template(prompt + answer, tokenize=False)[len(prompt_text) :]
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logps = torch.log_softmax(ctx.model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(logps[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).sum()), len(c)


def _completion_tokens(tokenizer, prompt, answer) -> int:
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completion = tokenizer.apply_chat_template(prompt + answer, tokenize=False)[len(prompt_text) :]
    return len(tokenizer(completion, add_special_tokens=False)["input_ids"])


def test_without_a_reference_the_length_bias_shows_in_the_normalised_accuracy(monkeypatch):
    # the issue: two random tiny models both read 0.875 on the built-in pairs (its run: 8 of them), because the
    # chosen answer is the shorter one in most pairs; per token, a random model has no preference
    monkeypatch.setattr(eval_tasks, "_warned_no_reference", False, raising=False)  # absent before the fix
    results, first8 = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for arch in ("llama", "qwen3"):
            ctx = _context(arch)
            results[arch] = eval_tasks.preference(ctx)
            ctx.limit = 8
            first8[arch] = eval_tasks.preference(ctx)["metrics"]
    for m in first8.values():  # the numbers, now beside the per-token ones
        assert m["accuracy"] == 0.875 and m["accuracy_length_normalised"] <= 0.5
    rows = eval_rows("builtin:preference_pairs", "preference", num_samples=256)
    tok = _context("llama").tokenizer
    # the 69%: the chosen answer has fewer characters in 176 of the 256 pairs
    assert sum(len(r["chosen"][0]["content"]) < len(r["rejected"][0]["content"]) for r in rows) == 176
    lengths = [
        (_completion_tokens(tok, r["prompt"], r["chosen"]), _completion_tokens(tok, r["prompt"], r["rejected"]))
        for r in rows
    ]
    shorter = (sum(c < r for c, r in lengths) + 0.5 * sum(c == r for c, r in lengths)) / len(rows)  # in tokens
    for m in (r["metrics"] for r in results.values()):  # all 256 pairs
        assert m["pairs"] == 256 and m["chosen_tokens"] < m["rejected_tokens"]
        assert m["accuracy"] == pytest.approx(shorter, abs=0.03)  # raw log-likelihood: the length bias
        assert abs(m["accuracy_length_normalised"] - 0.5) < 0.1  # per token: about chance
        assert m["accuracy"] - m["accuracy_length_normalised"] > 0.1
    # one warning for the four calls, saying a reference is the meaningful setting
    said = [str(w.message) for w in caught if "reference" in str(w.message)]
    assert len(said) == 1 and "favours the shorter answer" in said[0]
    report = {
        "models": ["tiny:llama", "tiny:qwen3"],
        "tasks": {"preference": {}},
        "results": {f"tiny:{a}": {"preference": r} for a, r in results.items()},
    }
    table = markdown_table(report)
    assert "| preference | accuracy_length_normalised |" in table
    assert "`accuracy` and `margin` are DPO's implicit reward" in table and "with its reference term left out" in table


def test_normalised_accuracy_against_a_direct_computation():
    ctx = _context("llama", limit=8)
    out = eval_tasks.preference(ctx, beta=0.5)["metrics"]
    rows = eval_rows("builtin:preference_pairs", "preference", num_samples=256, limit=8)
    raw, normalised, lengths = [], [], []
    for row in rows:
        (lc, nc), (lr, nr) = (_logp_and_tokens(ctx, row["prompt"], a) for a in (row["chosen"], row["rejected"]))
        raw.append(0.5 * (lc - lr))
        normalised.append(lc / nc - lr / nr)
        lengths.append((nc, nr))
    assert out["margin"] == pytest.approx(sum(raw) / 8, abs=1e-3)
    assert out["accuracy"] == pytest.approx(sum(m > 0 for m in raw) / 8)
    assert out["margin_length_normalised"] == pytest.approx(sum(normalised) / 8, abs=1e-4)
    assert out["accuracy_length_normalised"] == pytest.approx(sum(m > 0 for m in normalised) / 8)
    assert out["chosen_tokens"] == pytest.approx(sum(c for c, _ in lengths) / 8)


# a reward model whose tokenizer is not the policy's: a 300-token BPE (the policy's has 512) whose special tokens
# sit elsewhere, and a chat template of another shape
RM_TEMPLATE = (
    "{%- for message in messages %}{{- '### ' + message['role'] + ':\n' + message['content'] + '</s>\n' }}{%- endfor %}"
)


def _reward_model(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForSequenceClassification, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>", "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the cat sat on the mat", "what is the answer to the question"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = RM_TEMPLATE
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(5)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return rm.eval(), tokenizer


def test_the_reward_model_scores_with_its_own_tokenizer_and_template(tmp_path):
    rm, rm_tok = _reward_model(tmp_path / "rm")
    ctx = _context("llama", limit=6)
    assert rm_tok.get_vocab() != ctx.tokenizer.get_vocab()
    out = eval_tasks.preference(ctx, reward_model=str(tmp_path / "rm"))["metrics"]
    rows = eval_rows("builtin:preference_pairs", "preference", num_samples=256, limit=6)
    scores = {"chosen": [], "rejected": []}
    for row in rows:
        for side in scores:
            text = "".join(f"### {m['role']}:\n{m['content']}</s>\n" for m in row["prompt"] + row[side])
            ids = rm_tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                scores[side].append(float(rm(input_ids=torch.tensor([ids])).logits[0, 0]))
    margins = [c - r for c, r in zip(scores["chosen"], scores["rejected"])]
    assert out["chosen_reward"] == pytest.approx(sum(scores["chosen"]) / 6, abs=1e-5)
    assert out["rejected_reward"] == pytest.approx(sum(scores["rejected"]) / 6, abs=1e-5)
    assert out["margin"] == pytest.approx(sum(margins) / 6, abs=1e-5)
    assert out["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 6)


def test_plain_text_pairs_reach_the_reward_model_as_its_trainer_saw_them(tmp_path):
    # TRL's RewardTrainer on plain text: prompt + answer + EOS, through the reward model's tokenizer
    rm, rm_tok = _reward_model(tmp_path / "rm")
    pairs = [("The cat sat on", " the mat", " a question"), ("What is the answer?", " the answer", " no")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    out = eval_tasks.preference(_context("llama"), dataset=str(data), reward_model=str(tmp_path / "rm"))["metrics"]
    with torch.no_grad():
        score = lambda text: float(rm(input_ids=torch.tensor([rm_tok(text)["input_ids"]])).logits[0, 0])  # noqa: E731
        chosen, rejected = [score(p + c + "</s>") for p, c, _ in pairs], [score(p + r + "</s>") for p, _, r in pairs]
    assert out["chosen_reward"] == pytest.approx(sum(chosen) / 2, abs=1e-5)
    assert out["rejected_reward"] == pytest.approx(sum(rejected) / 2, abs=1e-5)
