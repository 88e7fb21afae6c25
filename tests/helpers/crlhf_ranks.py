"""Train constrained_rlhf/tiny for a few steps under `accelerate launch`; every rank writes its multipliers,
their momentum and thresholds (as exact hex floats) to <out_dir>/rank<R>.json (launched by test_distributed)."""

import json
import sys
from pathlib import Path

from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.runtime import close_process_group

out_dir = Path(sys.argv[1])
# two optimizer steps per generation batch: each rank holds other completions in a step; the step means are reduced
trainer = build_trainer(
    load_recipe(
        "constrained_rlhf/tiny",
        {
            "output_dir": str(out_dir),
            "max_steps": 4,
            "steps_per_generation": 2,
            "learning_rate": 1e-2,
            "save_strategy": "no",
        },
    )
)
trainer.train()
m = trainer.multipliers
momentum = m.optimizer.state[m.lam]["momentum_buffer"]
state = {
    "world": trainer.accelerator.num_processes,
    "lam": [x.hex() for x in m.lam.detach().tolist()],
    "momentum": [x.hex() for x in momentum.tolist()],
    "thresholds": trainer.thresholds,
    "kl": [e.get("constrained/kl") for e in trainer.state.log_history if "constrained/kl" in e],
}
(out_dir / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(state))
close_process_group()
