"""Unlearning data: (forget, retain) rows encoded for a causal LM, the retain stream, and PO's refusal answers.

``encode_example`` / ``encode_row`` tokenise a {prompt, completion} (plain or conversational) or {text} row with the
loss on the answer only; ``collate`` right-pads them; ``stream_indices`` is the endless, seeded retain order (a pure
function of the position, so a resumed run or another rank finds its rows from a counter). Used by WAGLE
(``trainers/wagle.py``) and by the unlearning eval (``evals/unlearning.py``).
"""

from __future__ import annotations

import torch

# PO targets. The official code reads a file of polite refusals (``files/data/polite_refusal_responses``, not copied
# here); this fixed list stands in for it: forget row i is answered with REFUSALS[i % len(REFUSALS)], so the targets
# are the same on every run.
REFUSALS = (
    "I'm sorry, but I don't have any information about that.",
    "I'm not able to answer that question.",
    "I don't know anything about that.",
    "That is not something I can help with.",
    "I'm afraid I can't say.",
    "I have no knowledge of that.",
    "Sorry, I cannot provide that information.",
    "I'd rather not answer that.",
)


ENCODED_FIELDS = ("input_ids", "attention_mask", "labels")


def encode_example(tokenizer, prompt, completion=None, max_length=512, prompt_template="{prompt}"):
    """{"input_ids", "labels"} of one example, labels -100 on the prompt. Conversational rows go through the chat
    template (prompt and answer tokenized apart, as TRL does); plain strings are ``prompt_template`` + completion +
    EOS; a text row (``completion`` None) is all target. Cut to ``max_length`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(prompt, list):
        head_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head_text):
            raise ValueError("the chat template renders the prompt differently inside the whole conversation")
        head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
        tail = tokenizer(full[len(head_text) :], add_special_tokens=False)["input_ids"]
    elif completion is None:
        head, tail = [], tokenizer(prompt)["input_ids"] + eos
    else:
        head = tokenizer(prompt_template.format(prompt=prompt))["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    ids, labels = (head + tail)[:max_length], ([-100] * len(head) + tail)[:max_length]
    if all(label == -100 for label in labels[1:]):
        raise ValueError(f"an example has no answer token within max_length={max_length}; raise max_length")
    return {"input_ids": ids, "labels": labels}


def encode_row(tokenizer, row, max_length=512, prompt_template="{prompt}", answer=None):
    """``encode_example`` of a dataset row ({prompt, completion} or {text}); ``answer`` replaces the completion
    (a plain string, wrapped as an assistant message for conversational rows)."""
    if "prompt" not in row or "completion" not in row:
        if answer is not None:
            raise ValueError("refusal answers need {prompt, completion} rows, not {text}")
        return encode_example(tokenizer, row["text"], None, max_length)
    completion = (
        row["completion"]
        if answer is None
        else ([{"role": "assistant", "content": answer}] if isinstance(row["prompt"], list) else answer)
    )
    return encode_example(tokenizer, row["prompt"], completion, max_length, prompt_template)


def collate(rows, pad_id, prefix=""):
    """Right-padded {"input_ids", "attention_mask", "labels"} from the rows' ``prefix``-ed token lists."""
    length = max(len(r[prefix + "input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r[prefix + "input_ids"])
        ids[i, :n], labels[i, :n], attention[i, :n] = (
            torch.tensor(r[prefix + "input_ids"]),
            torch.tensor(r[prefix + "labels"]),
            1,
        )
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def stream_indices(n, seed, start, count):
    """Positions start .. start+count-1 of the endless retain order perm_0 + perm_1 + ..., where perm_c is
    ``torch.randperm(n)`` seeded with seed + c: a pure function of the position, so a resumed run (or another rank)
    finds its retain rows from a counter alone."""
    out, position = [], start
    while len(out) < count:
        cycle, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + cycle))
        take = perm[offset : offset + count - len(out)].tolist()
        out += take
        position += len(take)
    return out
