"""SFT with ``moe_balance: aux_free`` on a fixed-length text set; every rank writes what it holds after each optimizer
step (the routers' biases as exact hex floats, the all-reduced loads) to <record>/rank<R>.json. Launched by
tests/test_moe_distributed.py with ``accelerate launch`` (2 ranks; DDP, ZeRO-2, ZeRO-3) and with plain python (1 rank).

    moe_ranks.py RECORD_DIR DATA.jsonl OUTPUT_DIR --model tiny:deepseek_v3 --batch 2 --max_steps 4 [--save_steps 2]
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from posttrain.recipes.config import build_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.moe_routers import expert_biases, find_routers
from posttrain.trainers.runtime import close_process_group
from posttrain.trainers.trl_seam import inner_model

ap = argparse.ArgumentParser()
ap.add_argument("record", type=Path)
ap.add_argument("data")
ap.add_argument("output_dir")
ap.add_argument("--model", default="tiny:deepseek_v3")
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--accum", type=int, default=1)
ap.add_argument("--max_steps", type=int, default=4)
ap.add_argument("--save_steps", type=int, default=0)
args = ap.parse_args()
torch.set_num_threads(1)

values = dict(
    method="sft",
    model_name_or_path=args.model,
    dataset=args.data,
    per_device_train_batch_size=args.batch,
    gradient_accumulation_steps=args.accum,
    max_length=64,
    learning_rate=1e-2,
    max_steps=args.max_steps,
    logging_steps=1,
    report_to="none",
    bf16=False,
    dtype="float32",
    seed=0,
    output_dir=args.output_dir,
    save_strategy="steps" if args.save_steps else "no",
    save_steps=args.save_steps or 500,
    moe_balance="aux_free",
    moe_bias_rate=1e-2,
    moe_bias_rule="sign",
)
if "qwen3_moe" in args.model:  # a softmax router: the bias must be allowed explicitly (moe_bias_on_softmax)
    values["moe_bias_on_softmax"] = True
trainer = build_trainer(build_recipe(values, {}, "moe_ranks"))


def hexes(model):
    return [[x.hex() for x in b.detach().double().cpu().tolist()] for b in expert_biases(find_routers(model))]


class Record(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        cb = trainer.moe_balance
        self.steps.append(
            {
                "step": state.global_step,
                "bias": hexes(inner_model(trainer.model)),
                "counts": [c.tolist() for c in cb.last_counts],
                "metrics": cb.last_metrics,
            }
        )


record = Record()
trainer.add_callback(record)  # after MoEBalanceCallback (first in the list): sees the updated biases
trainer.train()
acc = trainer.accelerator
out = {
    "world": acc.num_processes,
    "rank": acc.process_index,
    "distributed_type": acc.distributed_type.value,
    "zero_stage": getattr(acc.state.deepspeed_plugin, "zero_stage", None),
    "steps": record.steps,
    "bias_dtypes": [str(b.dtype) for b in expert_biases(find_routers(trainer.model))],
}
args.record.mkdir(parents=True, exist_ok=True)
(args.record / f"rank{acc.process_index}.json").write_text(json.dumps(out))
close_process_group()
