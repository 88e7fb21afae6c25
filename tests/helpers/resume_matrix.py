"""The resume matrix, one launch per backend (launched by tests/test_resume_matrix.py under ``accelerate launch``):
for each case, an uninterrupted 4-step run that saves every step, then a run resumed from its checkpoint-2 into
another folder. Every rank also writes the method state it holds at the end of each run to
<out>/<case>/<run>/rank<R>.pt, so the test can check that the ranks agree.

    resume_matrix.py OUT_DIR CASES_JSON          ({case: [recipe, overrides]}, tests/test_resume_matrix.py CASES)
"""

import json
import sys
from pathlib import Path

import torch

from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.method_state import method_state_owners
from posttrain.trainers.runtime import close_process_group

STEPS = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1, "logging_steps": 1, "report_to": "none"}


def run(case, name, resume=None):
    recipe, overrides = CASES[case]
    folder = OUT / case / name
    # the recipe (its TrainingArguments) right before the model loads: under ZeRO-3 it sets the config that
    # from_pretrained partitions with
    trainer = build_trainer(load_recipe(recipe, {**overrides, **STEPS, "output_dir": str(folder)}))
    trainer.train(resume_from_checkpoint=resume)
    acc = trainer.accelerator
    held = {owner: obj.method_state() for owner, obj in method_state_owners(trainer).items()}
    meta = {
        "world": acc.num_processes,
        "distributed_type": acc.distributed_type.value,
        "zero_stage": getattr(acc.state.deepspeed_plugin, "zero_stage", None),
    }
    torch.save({"meta": meta, "state": held}, folder / f"rank{acc.process_index}.pt")
    return folder


torch.set_num_threads(1)
OUT, CASES = Path(sys.argv[1]), json.loads(sys.argv[2])
for case in CASES:
    full = run(case, "full")
    run(case, "resumed", resume=str(full / "checkpoint-2"))
close_process_group()
