"""The auxiliary-trainer base: what every small non-LLM training loop in ``trainers/classic/`` shares.

A method subclasses two things:

- ``AuxConfig``: a dataclass of run controls (``seed``, ``max_steps``, ``eval_every``, ``save_every``,
  ``max_seconds``, ``output_dir``). The method's config extends it with its own fields, each with a ``help``
  metadata string and the paper's default. It changes a base field's default in its class line, not by
  redeclaring the field: ``class BandlimitedConfig(AuxConfig, max_steps=3, output_dir="runs/bandlimited")``
  (``__init_subclass__`` accepts only inherited field names, and the field keeps the base's type, help and place
  in the field order); what a step is for the method goes in the config's docstring. Its ``__post_init__`` calls
  ``super().__post_init__()`` after its own checks (a ValueError names the field); ``require_choice``,
  ``require_at_least``, ``require_positive`` and ``require_non_negative`` make the common ones.
- ``AuxTrainer``: ``__init__(args)`` seeds Python, NumPy and torch, sets ``self.rng`` (a NumPy Generator seeded
  with ``args.seed``), ``self.global_step = 0`` and ``self.history = []``, then calls ``setup()``. The method sets
  ``method`` (its registry name) and implements ``setup()`` (build the problem, model, optimizer),
  ``training_step() -> dict`` (ONE unit of work: a round, an epoch, an optimizer step; ``step()`` calls it and
  advances ``global_step``), ``evaluate() -> dict``, optionally ``done() -> bool`` (its own stop criterion) and
  ``description()`` (the progress bar's label). A method with state beyond its RNGs names the attributes that
  hold it in ``stateful`` (a module, optimizer or batch iterator by its ``state_dict()``, a torch Generator by its
  state, a tensor by a copy; each saved under its name), and for the rest extends ``state_dict()``
  (``{**super().state_dict(), ...}``) and ``load_state_dict(state)`` (``super().load_state_dict(state)`` first).

``train()`` runs ``step()`` until ``max_steps``, ``done()`` or ``max_seconds`` (wall clock of this call), with a
tqdm bar. Every ``eval_every`` steps it appends ``{"step", **step info, **evaluate()}`` to the history; every
``save_every`` steps and at the end it saves ``state_dict()`` to ``output_dir/aux_state.pt``. At the end it
writes ``results.json`` ({method, config, final, history}) and ``curves.png`` (one panel per logged number).
Every file is written to a temporary name and renamed, so a killed run never leaves a half-written one.
``train(resume=True)`` (``posttrain train <recipe> --resume``) loads ``aux_state.pt`` and continues: the state
holds the step, the history and every RNG, so the resumed run ends at the same numbers as an uninterrupted one.
A resume refuses a config that differs from the saved one, except in ``RESUME_FREE`` fields. ``save()`` / ``load()``
write / read that file (``last_saved_step`` records the step saved); ``recipes/train.py`` adds the output_dir lock
and refuses a fresh run into a folder that holds one, as for the LLM trainers.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.atomic import write_atomic, write_json_atomic
from posttrain.plots import pyplot

STATE_FILE = "aux_state.pt"
RESULTS_FILE = "results.json"
PLOT_FILE = "curves.png"
RESUME_FREE = ("output_dir", "max_seconds", "save_every", "eval_every")  # may change on --resume


@dataclass
class AuxConfig:
    seed: int = field(default=0, metadata={"help": "Seeds Python, NumPy (self.rng) and torch."})
    max_steps: int = field(default=1000, metadata={"help": "Units of work (step() calls) to run."})
    eval_every: int = field(default=100, metadata={"help": "Evaluate and log every this many steps."})
    save_every: int = field(
        default=0, metadata={"help": "Save the resumable state every this many steps (0: only at the end)."}
    )
    max_seconds: float = field(default=60.0, metadata={"help": "Wall-clock guard for one train() call."})
    output_dir: str = field(
        default="runs/aux", metadata={"help": "Where results.json, curves.png and aux_state.pt are written."}
    )

    def __init_subclass__(cls, **run_defaults):
        """``class C(AuxConfig, max_steps=3, output_dir="runs/c")``: C's defaults of inherited fields. Each becomes
        the field as C had redeclared it (the base's type and help, the new default), before ``@dataclass`` runs on
        C, so the field keeps its place in the base's order."""
        super().__init_subclass__()
        inherited = {f.name: f for f in dataclasses.fields(cls)}  # cls is not yet a dataclass: its bases' fields
        for name, value in run_defaults.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}: {name!r} is not an inherited field; valid: {', '.join(inherited)}")
            if "__annotations__" not in cls.__dict__:  # a config that adds no field of its own
                cls.__annotations__ = {}
            if name in cls.__annotations__:
                raise TypeError(f"{cls.__name__}: {name!r} is both declared in the class and set in its class line")
            cls.__annotations__[name] = inherited[name].type
            setattr(cls, name, field(default=value, metadata=dict(inherited[name].metadata)))

    def __post_init__(self):
        self.require_at_least(1, "max_steps", "eval_every")
        self.require_at_least(0, "seed", "save_every")
        self.require_positive("max_seconds")

    # The checks of a config's __post_init__: each raises a ValueError naming the first bad field and its value.
    def require_choice(self, **valid: Iterable[str]) -> None:
        """Each named field's value is one of its ``valid`` choices."""
        for name, choices in valid.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(choices)}")

    def require_at_least(self, low: int, *names: str) -> None:
        """Each named (integer) field is >= ``low``."""
        for name in names:
            if int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)!r}")

    def require_positive(self, *names: str) -> None:
        """Each named field is > 0 (NaN fails)."""
        for name in names:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def require_non_negative(self, *names: str) -> None:
        """Each named field is >= 0 (NaN fails)."""
        for name in names:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def save_part(part: object) -> object:
    """What ``state_dict()`` saves of a ``stateful`` attribute."""
    if isinstance(part, torch.Generator):
        return part.get_state()
    if isinstance(part, torch.Tensor):
        return part.detach().clone()
    return part.state_dict()


def load_part(part: object, saved: object) -> None:
    """Restore a ``stateful`` attribute in place from what ``save_part`` returned."""
    if isinstance(part, torch.Generator):
        part.set_state(saved)
    elif isinstance(part, torch.Tensor):
        with torch.no_grad():  # a trained tensor (a leaf that requires grad) is overwritten, not differentiated
            part.copy_(saved)
    else:
        part.load_state_dict(saved)


class AuxTrainer:
    """Base of the auxiliary trainers; see the module docstring for what a method implements."""

    method = "aux"  # the registry name, used in results.json and the progress bar
    stateful: tuple[str, ...] = ()  # the attributes state_dict() saves and load_state_dict() restores, by name

    def __init__(self, args: AuxConfig):
        self.args, self.global_step, self.history, self.last_saved_step = args, 0, [], None
        random.seed(args.seed)
        np.random.seed(args.seed % 2**32)
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self.setup()

    def setup(self) -> None:  # build the problem, model, optimizer
        pass

    def training_step(self) -> dict:  # ONE unit of work; returns its numbers
        raise NotImplementedError

    def step(self) -> dict:
        """One unit of work: ``training_step()``, then ``global_step`` advances. Returns the step's numbers."""
        info = self.training_step()
        self.global_step += 1
        return info

    def evaluate(self) -> dict:
        return {}

    def done(self) -> bool:  # a method's own stop criterion
        return False

    def description(self) -> str:  # the progress bar's label
        return self.method

    def minibatch_sgd_state(self) -> dict:
        """What a trainer of one torch ``model`` by ``optimizer`` on minibatches drawn in ``order`` by ``generator``
        adds to ``state_dict`` (``load_minibatch_sgd_state`` restores it)."""
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
        }

    def load_minibatch_sgd_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()

    def state_dict(self) -> dict:
        rngs = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "generator": self.rng.bit_generator.state,
        }
        if torch.cuda.is_available():
            rngs["cuda"] = torch.cuda.get_rng_state_all()
        config = {k: v for k, v in dataclasses.asdict(self.args).items() if k not in RESUME_FREE}
        parts = {name: save_part(getattr(self, name)) for name in self.stateful}
        return {"step": self.global_step, "history": list(self.history), "rng": rngs, "config": config, **parts}

    def load_state_dict(self, state: dict) -> None:
        mine = {k: v for k, v in dataclasses.asdict(self.args).items() if k not in RESUME_FREE}
        diff = sorted(k for k in mine.keys() | state["config"].keys() if mine.get(k) != state["config"].get(k))
        if diff:
            raise ValueError(
                "cannot resume: the config differs from the saved run in "
                + ", ".join(f"{k} (saved {state['config'].get(k)!r}, now {mine.get(k)!r})" for k in diff)
            )
        self.global_step, self.history = int(state["step"]), list(state["history"])
        rngs = state["rng"]
        random.setstate(rngs["python"])
        np.random.set_state(rngs["numpy"])
        torch.set_rng_state(rngs["torch"])
        self.rng.bit_generator.state = rngs["generator"]
        if "cuda" in rngs and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rngs["cuda"])
        for name in self.stateful:
            load_part(getattr(self, name), state[name])

    def save(self) -> None:
        state = self.state_dict()
        write_atomic(Path(self.args.output_dir) / STATE_FILE, lambda tmp: torch.save(state, tmp))
        self.last_saved_step = self.global_step

    def load(self) -> bool:
        """Load ``output_dir/aux_state.pt`` if there is one; True if it was loaded."""
        path = Path(self.args.output_dir) / STATE_FILE
        if not path.is_file():
            return False
        # weights_only=False: the state holds NumPy arrays and RNG tuples; the file is this run's own.
        self.load_state_dict(torch.load(path, weights_only=False))
        self.last_saved_step = self.global_step
        return True

    def train(self, verbose: bool = True, resume: bool = False) -> dict:
        a, start, stopped_by = self.args, time.monotonic(), "max_steps"
        if resume and not self.load() and verbose:
            print(f"posttrain: no {STATE_FILE} in {a.output_dir}; starting from scratch")
        with tqdm(
            total=a.max_steps, initial=self.global_step, desc=self.description(), disable=None if verbose else True
        ) as bar:
            while self.global_step < a.max_steps:
                if self.done():
                    stopped_by = "criterion"
                    break
                if time.monotonic() - start > a.max_seconds:
                    stopped_by = "max_seconds"
                    break
                info = self.step()
                bar.update(1)
                if self.global_step % a.eval_every == 0:
                    self.history.append({"step": self.global_step, **info, **self.evaluate()})
                if a.save_every and self.global_step % a.save_every == 0:
                    self.save()
        self.save()
        final = {
            "step": self.global_step,
            **self.evaluate(),
            "seconds": time.monotonic() - start,
            "stopped_by": stopped_by,
        }
        self.write_results(final)
        if verbose:
            print(f"\n{self.description()}: seed {a.seed}, {self.global_step} steps, stopped by {stopped_by}")
            for k, v in final.items():
                print(f"  {k:<22} {v:.6g}" if isinstance(v, float) else f"  {k:<22} {v}")
        return final

    def write_results(self, final: dict) -> None:
        out = Path(self.args.output_dir)
        results = {
            "method": self.method,
            "config": dataclasses.asdict(self.args),
            "final": final,
            "history": self.history,
        }
        write_json_atomic(out / RESULTS_FILE, results)
        write_atomic(out / PLOT_FILE, lambda tmp: plot_history(self.history, tmp, self.description()))


def run_arms(
    config_cls: type,
    trainer_cls: type,
    arms: dict[str, dict],
    seeds: Iterable[int],
    output_dir: str,
    *,
    expect: str = "max_steps",
    extra: Callable[[str, AuxTrainer, dict], None] | None = None,
    **overrides,
) -> dict[str, list[dict]]:
    """Every arm (name -> its config values) on every seed, each run in ``output_dir/<arm>-seed<seed>`` -> {arm:
    [final ``evaluate()`` per seed]}. A run stopped otherwise than by ``expect`` (e.g. by ``max_seconds``) is not
    comparable with the others: an error. ``extra(arm, trainer, final)`` adds a method's own numbers to ``final``."""
    out: dict[str, list[dict]] = {}
    for arm, values in arms.items():
        for seed in seeds:
            folder = os.path.join(output_dir, f"{arm}-seed{seed}")
            trainer = trainer_cls(config_cls(seed=seed, output_dir=folder, **values, **overrides))
            final = trainer.train(verbose=False)
            if final["stopped_by"] != expect:
                raise RuntimeError(f"{arm} seed {seed} stopped by {final['stopped_by']} after {final['step']} steps")
            if extra is not None:
                extra(arm, trainer, final)
            out.setdefault(arm, []).append(final)
    return out


def plot_history(history: list[dict], path: str, title: str) -> None:
    """One panel per numeric key of the history, against ``step`` (matplotlib, Agg backend)."""
    plt = pyplot()

    keys = [
        k
        for k in (history[0] if history else {})
        if k != "step" and all(isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool) for h in history)
    ]
    cols = min(3, max(len(keys), 1))
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.plot([h["step"] for h in history], [h[key] for h in history])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.subplots_adjust(hspace=0.5, wspace=0.3)  # not tight_layout: that doubles the time of a many-panel plot
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
