"""WAGLE phase 1 and two training steps, run by 1 or 2 processes (DDP or DeepSpeed; launched by test_wagle).

Every rank writes, under the folder given as argv[1], rank{r}.safetensors: its phase-1 forget/retain gradient sums
(as the trainer hands them to build_mask, after any reduction), its mask, and the full parameters before and after
training (gathered under ZeRO-3), so the test can check that the ranks agree with each other and with one process on
the same batches, and that masked weights did not move.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.runtime import close_process_group

torch.set_num_threads(1)
out = Path(sys.argv[1])
# 10 forget rows in per-device batches of 2: 5 attribution batches, so 2 ranks get 3 and 2 of them
recipe = load_recipe(
    "wagle/tiny",
    {
        "per_device_train_batch_size": 2,
        "mask_ratio": 0.5,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "output_dir": str(out / "run"),
    },
)
trainer = build_trainer(recipe)
recorded, gradient_sums = {}, trainer.gradient_sums


def recording(batches):  # build_mask consumes the sums: keep copies
    sums = gradient_sums(batches)
    prefix = "gr" if "batches" in recorded else "gf"
    recorded.setdefault("batches", torch.tensor(len(batches)))
    recorded.update({f"{prefix}/{n}": t.detach().cpu().clone() for n, t in sums.items()})
    return sums


def full_parameters(prefix):
    params = list(trainer.model.named_parameters())
    if hasattr(params[0][1], "ds_id"):  # ZeRO-3: gathered while read
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in params])
    else:
        gathered = nullcontext()
    with gathered:
        return {f"{prefix}/{n}": p.detach().cpu().clone() for n, p in params}


trainer.gradient_sums = recording
initial = full_parameters("initial")
trainer.train()
tensors = {**recorded, **initial, **full_parameters("param"), **{f"mask/{n}": m for n, m in trainer.mask.items()}}
tensors["world"] = torch.tensor(trainer.accelerator.num_processes)
save_file(
    {k: v.contiguous().cpu() for k, v in tensors.items()},
    str(out / f"rank{trainer.accelerator.process_index}.safetensors"),
)
close_process_group()
