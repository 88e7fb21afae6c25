"""WAGLE phase 1 and two training steps, run by 1 or 2 processes (launched by test_wagle).

Every rank writes, under the folder given as argv[1]: its phase-1 forget/retain gradient sums (after the all-reduce),
its mask and its parameters after training (rank{r}.safetensors), so the test can check that the ranks agree with
each other and with a single process on the same batches.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer

torch.set_num_threads(1)
out = Path(sys.argv[1])
# 10 forget rows in per-device batches of 2: 5 attribution batches, so 2 ranks get 3 and 2 of them
recipe = load_recipe("wagle/tiny", {"per_device_train_batch_size": 2, "mask_ratio": 0.5, "max_steps": 2,
                                    "learning_rate": 1e-2, "output_dir": str(out / "run")})
trainer = build_trainer(recipe)
rank = trainer.accelerator.process_index
forget, retain = trainer.attribution_batches()
sums = {f"gf/{n}": t for n, t in trainer.gradient_sums(forget).items()}
sums.update({f"gr/{n}": t for n, t in trainer.gradient_sums(retain).items()})
trainer.train()
tensors = {**sums, **{f"mask/{n}": m for n, m in trainer.mask.items()},
           **{f"param/{n}": p.detach() for n, p in trainer.model.named_parameters()}}
tensors["batches"] = torch.tensor([len(forget), trainer.accelerator.num_processes])
save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"))
