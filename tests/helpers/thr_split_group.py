"""THR advantages of a fixed generation batch, computed by 1 or 2 processes (launched by test_thr_grpo).

Three groups of 8 completions, 12 rows per rank with 2 processes: the middle group is split across the ranks (rows
8-11 on rank 0, 12-15 on rank 1), so a rank that computed its groups from its own rows alone would differ. Rank 0
writes the (N, T) advantages of the whole batch, gathered, to the JSON path given as argv[1].
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.advantages import grpo_group_advantages
from posttrain.trainers.runtime import close_process_group

out_path = sys.argv[1]
trainer = build_trainer(
    load_recipe(
        "thr_grpo/tiny",
        {
            "num_generations": 8,
            "per_device_train_batch_size": 24 // int(os.environ.get("WORLD_SIZE", "1")),
            "output_dir": "/tmp/thr-split",
        },
    )
)
acc = trainer.accelerator
world, rank = acc.num_processes, acc.process_index
# The generation batch of the whole run, fixed: 24 completions of up to 10 tokens after 5-token prompts.
g = torch.Generator().manual_seed(0)
n, t = 24, 10
prompt_ids = torch.randint(4, 500, (n, 5), generator=g)
completion_ids = torch.randint(4, 500, (n, t), generator=g)
lengths = torch.randint(3, t + 1, (n,), generator=g)
completion_mask = (torch.arange(t)[None] < lengths[:, None]).long()
rewards = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.float32)
advantages = torch.cat([grpo_group_advantages(r) for r in rewards.view(-1, 8)])

rows = slice(rank * n // world, (rank + 1) * n // world)
local_t = int(lengths[rows].max())  # TRL pads completions per process: widths differ across ranks
device = acc.device
out = {
    "prompt_ids": prompt_ids[rows].to(device),
    "prompt_mask": torch.ones_like(prompt_ids[rows]).to(device),
    "completion_ids": completion_ids[rows, :local_t].to(device),
    "completion_mask": completion_mask[rows, :local_t].to(device),
    "advantages": advantages[rows].to(device),
}
local = trainer.thr_token_advantages(out, rewards.to(device))
everything = acc.gather(F.pad(local, (0, t - local_t)))
if acc.is_main_process:
    json.dump(
        {"world": world, "advantages": everything.tolist(), "metrics": dict(trainer._metrics["train"])},
        open(out_path, "w"),
    )
close_process_group()
