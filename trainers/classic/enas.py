"""ENAS with and without a memory buffer, and random search with shared weights, on a small MLP cell space.

Paper: G. Adam, J. Lorraine, "Understanding Neural Architecture Search Techniques", arXiv 1904.00438, 2019. No code
was found; everything here is written from the paper's description and from ENAS (H. Pham et al., "Efficient Neural
Architecture Search via Parameter Sharing", arXiv 1802.03268).

ENAS: an LSTM controller pi_phi samples an architecture one decision at a time (for each node its input, then its
op), feeding each decision back as the next input. A shared weight pool omega is trained on the sampled children
(train split); the controller is trained with REINFORCE on the child's validation accuracy R, with a moving-average
baseline b <- decay b + (1 - decay) R and an entropy bonus:  L_REINFORCE = -mean_s (R_s - b) log pi(a_s) - w_H H.

The paper's findings: ENAS is not significantly better than random search with weight sharing (``arm: random``:
omega trained on uniformly sampled children, then the best of 50 uniform samples), and the controller's hidden
state encodes no notion of the architecture's structure. Its fix: train the controller with a memory buffer of
previously sampled architectures so that the hidden state must encode the past decisions.

**UNVERIFIED: the exact buffer loss.** The paper's loss could not be confirmed; this is a faithful-in-spirit
reconstruction (``arm: enas_buffer``): a FIFO buffer of the last 500 sampled architectures; each controller step
replays ``replay_batch`` of them through the controller (teacher forcing), and at every decision t a linear head on
h_t predicts each earlier decision a_k, k < t (cross-entropy, ``decode_loss``); the controller loss is
L_REINFORCE + mu * L_decode with mu = 1. The final state h_T (after the last decision is fed back) is the
architecture's hidden state.

The search space (``posttrain train enas/digits_enas``): digits; a cell of 4 nodes, node i takes its input from
{x, node 0, ..., node i-1} through its own shared Linear(64, 64) for that input (10 linears in all, shared by
every architecture) and applies an op from {tanh, relu, sigmoid, identity}; the cell's output is the mean of the
loose ends (nodes no later node reads), then a shared Linear(64, 10). 4 * 8 * 12 * 16 = 6144 architectures.
A step is one shared-omega minibatch, then one controller update from 4 sampled children (none for ``random``).
The structure measure is the Spearman correlation, over 200 pairs of sampled architectures, between the distance
of their hidden states and their graph edit distance (``graph_edit_distance``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.trainers.classic.base import AuxConfig, AuxTrainer
from posttrain.trainers.classic.nas_space import N_CLASSES, N_FEATURES, Batches, digits_splits

ARMS = ("enas", "enas_buffer", "random")
OPS = ("tanh", "relu", "sigmoid", "identity")
OP_FNS = (torch.tanh, F.relu, torch.sigmoid, lambda z: z)


@dataclass
class ENASConfig(AuxConfig, max_steps=400, output_dir="runs/enas"):
    """A step alternates one shared-weight step and one controller update."""

    arm: str = field(
        default="enas",
        metadata={
            "help": "enas: REINFORCE controller; enas_buffer: plus the memory-buffer decoding loss (UNVERIFIED "
            "reconstruction); random: uniform sampling with shared weights, no controller."
        },
    )
    nodes: int = field(default=4, metadata={"help": "Nodes of the cell."})
    width: int = field(default=64, metadata={"help": "Width of every node (the shared Linear layers)."})
    controller_hidden: int = field(default=32, metadata={"help": "LSTM hidden size (and decision embedding size)."})
    samples_per_update: int = field(default=4, metadata={"help": "Children sampled per controller update."})
    controller_lr: float = field(default=3.5e-4, metadata={"help": "Adam learning rate of the controller (ENAS)."})
    entropy_weight: float = field(default=1e-4, metadata={"help": "Entropy bonus w_H (ENAS)."})
    baseline_decay: float = field(default=0.99, metadata={"help": "Moving-average baseline decay (ENAS)."})
    buffer_size: int = field(default=500, metadata={"help": "FIFO memory buffer of sampled architectures."})
    replay_batch: int = field(default=32, metadata={"help": "Architectures replayed from the buffer per update."})
    decode_weight: float = field(default=1.0, metadata={"help": "mu: weight of the decoding loss (enas_buffer)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the shared weights."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of the shared weights."})
    batch_size: int = field(default=64, metadata={"help": "Minibatch of the shared step and of each reward."})
    final_samples: int = field(default=50, metadata={"help": "Architectures sampled to pick the best found."})
    corr_pairs: int = field(default=200, metadata={"help": "Pairs of architectures for the hidden/graph correlation."})

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        self.require_at_least(1, "nodes", "width", "controller_hidden", "samples_per_update", "buffer_size")
        self.require_at_least(1, "replay_batch", "batch_size", "final_samples")
        self.require_at_least(3, "corr_pairs")
        self.require_positive("controller_lr", "learning_rate")
        self.require_non_negative("entropy_weight", "decode_weight", "weight_decay")
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay!r}")
        super().__post_init__()


# --- pure math: the search space -----------------------------------------------------------------------------


def decision_sizes(nodes: int) -> list[int]:
    """Choices of each decision: node i's input (i + 1: x or an earlier node), then its op (4)."""
    return [n for i in range(nodes) for n in (i + 1, len(OPS))]


def loose_ends(arch: tuple[int, ...] | list[int]) -> list[int]:
    """Nodes no later node takes as input (input choice j >= 1 reads node j - 1)."""
    nodes = len(arch) // 2
    used = {arch[2 * i] - 1 for i in range(nodes) if arch[2 * i] >= 1}
    return [i for i in range(nodes) if i not in used]


def describe(arch: tuple[int, ...] | list[int]) -> str:
    """A cell in words, e.g. "n0=tanh(x) n1=relu(n0) out=mean(n1)"."""
    nodes = [
        f"n{i}={OPS[arch[2 * i + 1]]}({'x' if arch[2 * i] == 0 else f'n{arch[2 * i] - 1}'})"
        for i in range(len(arch) // 2)
    ]
    return " ".join(nodes) + f" out=mean({','.join(f'n{i}' for i in loose_ends(arch))})"


def arch_graph(arch: tuple[int, ...] | list[int]) -> tuple[dict, set]:
    """The cell as a labelled DAG: ({node: label}, {(src, dst)}), nodes "x", 0..n-1 (labelled by op) and "out"."""
    nodes = len(arch) // 2
    labels = {"x": "x", "out": "out", **{i: OPS[arch[2 * i + 1]] for i in range(nodes)}}
    edges = {("x" if arch[2 * i] == 0 else arch[2 * i] - 1, i) for i in range(nodes)}
    edges |= {(i, "out") for i in loose_ends(arch)}
    return labels, edges


def graph_edit_distance(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """Edit distance between two cells with the nodes matched by index (node i of a is node i of b): one per
    relabelled node (op) plus one per edge inserted or deleted. Both cells have the same node set, so no node is
    inserted or deleted; fixing the node map makes this an upper bound of the unrestricted (NP-hard) GED, and it is
    the natural distance here since node i is the i-th decision of the controller."""
    la, ea = arch_graph(a)
    lb, eb = arch_graph(b)
    return sum(la[k] != lb[k] for k in la) + len(ea ^ eb)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (scipy; NaN if either side is constant)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


# --- the shared weights and the controller -------------------------------------------------------------------


class SharedCell(nn.Module):
    """omega: one Linear(64, width) per (node, input) pair and the classifier; any architecture runs on it."""

    def __init__(self, nodes: int, width: int):
        super().__init__()
        self.nodes = nodes
        self.proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(N_FEATURES if j == 0 else width, width) for j in range(i + 1)) for i in range(nodes)
        )
        self.head = nn.Linear(width, N_CLASSES)

    def forward(self, x: torch.Tensor, arch: tuple[int, ...] | list[int]) -> torch.Tensor:
        outs = []
        for i in range(self.nodes):
            j, op = arch[2 * i], arch[2 * i + 1]
            outs.append(OP_FNS[op](self.proj[i][j](x if j == 0 else outs[j - 1])))
        return self.head(torch.stack([outs[i] for i in loose_ends(arch)]).mean(0))


class Controller(nn.Module):
    """LSTM controller: decision t is sampled from head_t(h_t); its embedding is the next input. ``decoders[k]``
    read a_k back from a later state (the buffer's decoding loss)."""

    def __init__(self, sizes: list[int], hidden: int):
        super().__init__()
        self.sizes = sizes
        self.start = nn.Parameter(torch.zeros(hidden))
        self.cell = nn.LSTMCell(hidden, hidden)
        self.embed = nn.ModuleList(nn.Embedding(n, hidden) for n in sizes)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)
        self.decoders = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)

    def forward(
        self, batch: int, actions: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Sample ``batch`` architectures (or teacher-force ``actions`` (B, T)). Returns actions (B, T), log_prob
        (B,), entropy (B,), and hiddens (B, T + 1, H): h_0..h_{T-1} (decision t is drawn from h_t) and h_T, the
        state after the last decision is fed back (the architecture's hidden state)."""
        inp = self.start.expand(batch, -1)
        state, hiddens, chosen, logp, ent = None, [], [], 0.0, 0.0
        for t in range(len(self.sizes)):
            state = self.cell(inp, state)
            h = state[0]
            hiddens.append(h)
            logits = torch.log_softmax(self.heads[t](h), dim=-1)
            if actions is None:
                a = torch.multinomial(logits.detach().exp(), 1, generator=generator).squeeze(1)
            else:
                a = actions[:, t]
            chosen.append(a)
            logp = logp + logits.gather(1, a[:, None]).squeeze(1)
            ent = ent - (logits.exp() * logits).sum(-1)
            inp = self.embed[t](a)
        hiddens.append(self.cell(inp, state)[0])
        return {"actions": torch.stack(chosen, 1), "log_prob": logp, "entropy": ent, "hiddens": torch.stack(hiddens, 1)}

    def decode_loss(self, actions: torch.Tensor) -> torch.Tensor:
        """Mean over t = 1..T and k < t of CE(decoders[k](h_t), a_k), teacher-forcing ``actions`` (B, T)."""
        hiddens = self(actions.shape[0], actions=actions)["hiddens"]
        terms = []  # decision k is read from every later state h_{k+1..T} at once
        for k, decoder in enumerate(self.decoders):
            later = hiddens[:, k + 1 :]
            logits = decoder(later)
            target = actions[:, k : k + 1].expand(-1, later.shape[1])
            terms.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none"))
        return torch.cat(terms).mean()


def reinforce_loss(
    log_prob: torch.Tensor, entropy: torch.Tensor, rewards: torch.Tensor, baseline: float, entropy_weight: float
) -> torch.Tensor:
    """-mean_s (R_s - b) log pi(a_s) - w_H mean_s H_s (the advantage is a constant)."""
    return -((rewards - baseline) * log_prob).mean() - entropy_weight * entropy.mean()


def uniform_archs(sizes: list[int], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` architectures with every decision uniform: (count, T)."""
    return torch.stack([torch.randint(n, (count,), generator=generator) for n in sizes], 1)


# --- the trainer ---------------------------------------------------------------------------------------------


class ENASTrainer(AuxTrainer):
    """ENAS / ENAS + buffer / random search with shared weights; one step is one shared-omega minibatch and (for
    the controller arms) one controller update."""

    method = "enas"
    stateful = ("shared", "controller", "opt_w", "opt_c", "train_batches", "val_batches", "sampler")

    def setup(self) -> None:
        args = self.args
        self.data = digits_splits(args.seed)
        self.sizes = decision_sizes(args.nodes)
        self.shared = SharedCell(args.nodes, args.width)
        self.controller = Controller(self.sizes, args.controller_hidden)
        self.opt_w = torch.optim.AdamW(self.shared.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.opt_c = torch.optim.Adam(self.controller.parameters(), lr=args.controller_lr)
        self.train_batches = Batches(*self.data["train"], args.batch_size, args.seed)
        self.val_batches = Batches(*self.data["val"], args.batch_size, args.seed + 1)
        self.sampler = torch.Generator().manual_seed(args.seed + 2)
        self.baseline: float | None = None
        self.buffer: deque = deque(maxlen=args.buffer_size)

    def description(self) -> str:
        return f"enas[{self.args.arm}]"

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        generator = self.sampler if generator is None else generator
        if self.args.arm == "random":
            return uniform_archs(self.sizes, count, generator)
        with torch.no_grad():
            return self.controller(count, generator=generator)["actions"]

    def eval_generator(self) -> torch.Generator:
        """Evaluation draws from its own generator, seeded by (seed, step): how often one evaluates does not
        change the training trajectory."""
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.global_step)

    def training_step(self) -> dict:
        args = self.args
        arch = self.sample(1)[0].tolist()  # shared step: omega on one sampled child
        self.shared.train()
        x, y = self.train_batches.next()
        loss = F.cross_entropy(self.shared(x, arch), y)
        self.opt_w.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_w.step()
        info = {"shared_loss": float(loss.detach())}
        if args.arm == "random":
            return info
        out = self.controller(args.samples_per_update, generator=self.sampler)  # controller step
        x, y = self.val_batches.next()
        with torch.no_grad():
            rewards = torch.tensor([self._acc(x, y, a.tolist()) for a in out["actions"]])
        mean_r = float(rewards.mean())
        self.baseline = mean_r if self.baseline is None else self.baseline
        loss_c = reinforce_loss(out["log_prob"], out["entropy"], rewards, self.baseline, args.entropy_weight)
        self.baseline = args.baseline_decay * self.baseline + (1 - args.baseline_decay) * mean_r
        info.update(reward=mean_r, entropy=float(out["entropy"].detach().mean()), baseline=self.baseline)
        if args.arm == "enas_buffer":
            self.buffer.extend(tuple(a) for a in out["actions"].tolist())
            pick = self.rng.integers(len(self.buffer), size=min(args.replay_batch, len(self.buffer)))
            decode = self.controller.decode_loss(torch.tensor([self.buffer[i] for i in pick]))
            loss_c = loss_c + args.decode_weight * decode
            info["decode_loss"] = float(decode.detach())
        self.opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        self.opt_c.step()
        return info

    @torch.no_grad()
    def _acc(self, x: torch.Tensor, y: torch.Tensor, arch: list[int]) -> float:
        self.shared.eval()
        return float((self.shared(x, arch).argmax(-1) == y).float().mean())

    @torch.no_grad()
    def hidden_graph_correlation(self) -> float:
        """Spearman(||h_T(a) - h_T(b)||, GED(a, b)) over ``corr_pairs`` pairs sampled from the controller."""
        out = self.controller(2 * self.args.corr_pairs, generator=self.eval_generator())
        h, acts = out["hiddens"][:, -1], out["actions"].tolist()
        dist = (h[0::2] - h[1::2]).norm(dim=-1).tolist()
        ged = [graph_edit_distance(acts[2 * i], acts[2 * i + 1]) for i in range(self.args.corr_pairs)]
        return spearman(dist, ged)

    @torch.no_grad()
    def evaluate(self) -> dict:
        archs = self.sample(self.args.final_samples, self.eval_generator()).tolist()
        accs = [self._acc(*self.data["val"], a) for a in archs]
        best = int(np.argmax(accs))
        out = {
            "best_val_acc": accs[best],
            "mean_val_acc": float(np.mean(accs)),
            "best_test_acc": self._acc(*self.data["test"], archs[best]),
            "best_arch": describe(archs[best]),
        }
        if self.args.arm != "random":
            out["hidden_graph_spearman"] = self.hidden_graph_correlation()
        return out

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "baseline": self.baseline,
            "buffer": list(self.buffer),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.baseline = state["baseline"]
        self.buffer = deque((tuple(a) for a in state["buffer"]), maxlen=self.args.buffer_size)


def search(arm: str, seed: int, **overrides) -> dict:
    """One arm's run without files: ``max_steps`` steps, then ``evaluate()`` (the experiment's and the test's unit)."""
    trainer = ENASTrainer(ENASConfig(arm=arm, seed=seed, **overrides))
    for _ in range(trainer.args.max_steps):
        trainer.step()
    return trainer.evaluate()
