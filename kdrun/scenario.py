"""Continual scenarios: a dataset's classes cut into experiences, trained one after another.

`scenario=split` turns any method's stages into a sequence: for each experience, the stages the method gives for
it (`Method.experience_stages`), drawing only that experience's training images and reporting every experience's
test images under both protocols of the same training (as Mammoth does):

- class-incremental, `class_il/exp<j>`: one head over all the classes seen so far (logits of later classes masked);
- task-incremental, `task_il/exp<j>`: logits masked to experience j's own classes.

The engine evaluates every stage's last epoch; the evaluations after each experience's last stage are the accuracy
matrices R[i][j] (after training on experience i, accuracy on experience j), from which `summary` derives the
mean accuracy, backward transfer and forgetting. The run writes them to `accuracy_matrix.json` (and a heat map).
"""

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from kdrun.data import Data, EvalSet, Selection
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger
from kdrun.methods.base import Method, Stage

log = logging.getLogger(__name__)

PROTOCOLS = ("class_il", "task_il")


class Split:
    """`experiences` groups of classes in `class_order` (null: 0..C-1; "shuffle": a permutation drawn with `seed`;
    or a list of every class). `cumulative`: experience i trains on the images of experiences 0..i (the upper
    bound: its last experience is joint training on everything). `fresh_optimizer`: a new optimizer and LR
    schedule per experience (else one schedule spans them all)."""

    def __init__(self, experiences: int = 5, class_order: list[int] | str | None = None, seed: int = 0,
                 cumulative: bool = False, fresh_optimizer: bool = True):
        self.experiences, self.class_order, self.seed = experiences, class_order, seed
        self.cumulative, self.fresh_optimizer = cumulative, fresh_optimizer
        self.groups: list[tuple[int, ...]] = []
        self.has_val = False

    def setup(self, data: Data) -> None:
        """Cut `data`'s classes into the experiences."""
        n, self.has_val = data.num_classes, data.val is not None
        if not isinstance(self.experiences, int) or not 1 <= self.experiences <= n:
            raise KdrunError(f"scenario.experiences={self.experiences}, but {data.name} has {n} classes; give a "
                             f"number from 1 to {n}")
        if self.class_order is None:
            order = list(range(n))
        elif self.class_order == "shuffle":
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        else:
            order = [int(c) for c in self.class_order]
            if sorted(order) != list(range(n)):
                raise KdrunError(f"scenario.class_order={order} is not an order of {data.name}'s {n} classes; give "
                                 f"each of 0..{n - 1} once, null for 0..{n - 1}, or shuffle")
        self.groups = [tuple(g.tolist()) for g in torch.tensor(order).tensor_split(self.experiences)]

    def record(self) -> dict:
        """The experiences' classes, for the run dir's scenario.json."""
        return {"experiences": [list(g) for g in self.groups], "cumulative": self.cumulative}

    def stages(self, method: Method, epochs: int) -> list[Stage]:
        """Each experience's stages (the method's for it), on that experience's images, reporting every experience
        under both protocols and `test` (and `val`) over the classes seen so far. Each stage's `info` tells the
        method where it is: `experience` (i), `experiences` (how many), `classes` (i's), `seen` (0..i's)."""
        out = []
        for i, classes in enumerate(self.groups):
            seen = tuple(c for g in self.groups[:i + 1] for c in g)
            sets = (*(EvalSet(name, name, seen, mask=seen) for name in ("val",) if self.has_val),
                    EvalSet("test", "test", seen, mask=seen),
                    *(EvalSet(f"class_il/exp{j}", "test", g, mask=seen) for j, g in enumerate(self.groups)),
                    *(EvalSet(f"task_il/exp{j}", "test", g, mask=g) for j, g in enumerate(self.groups)))
            own = method.experience_stages(epochs, i)
            for k, stage in enumerate(own):
                if stage.data is not None or stage.evaluate is not None:
                    raise KdrunError(f"the method's stage '{stage.name}' chooses its own data or evaluation, which a "
                                     "continual scenario chooses per experience; run this method without scenario=")
                out.append(replace(
                    stage, name=f"exp{i}" + (f"/{stage.name}" if len(own) > 1 else ""),
                    data=Selection(classes=seen if self.cumulative else classes), evaluate=sets,
                    fresh_optimizer=stage.fresh_optimizer if k else i == 0 or self.fresh_optimizer,
                    info={**stage.info, "experience": i, "experiences": len(self.groups), "classes": classes,
                          "seen": seen}))
        return out

    def matrices(self, stages: list[Stage], results: list[dict]) -> dict[str, list[list[float]]]:
        """R[i][j] per protocol from each stage's last evaluation (`results`, aligned with `stages`): the row of
        experience i is the evaluation after its last stage. A run cut short has the rows it reached."""
        last = {}
        for stage, result in zip(stages, results):
            last[stage.info["experience"]] = result
        rows = [last[i] for i in sorted(last)]
        return {p: [[row[f"{p}/exp{j}/acc"] for j in range(len(self.groups))] for row in rows] for p in PROTOCOLS}


def summary(matrices: dict[str, list[list[float]]]) -> dict[str, float | None]:
    """Per protocol, after the last experience T reached: the mean accuracy over experiences 0..T, backward
    transfer (the mean of R[T][j] - R[j][j] over j < T; Lopez-Paz & Ranzato 2017) and forgetting (the mean of
    max over l < T of R[l][j], less R[T][j]; Chaudhry et al. 2018); None where T = 0."""
    out = {}
    for p, r in matrices.items():
        t = len(r) - 1
        out[f"cl/{p}/acc"] = sum(r[t][:t + 1]) / (t + 1)
        out[f"cl/{p}/bwt"] = sum(r[t][j] - r[j][j] for j in range(t)) / t if t else None
        out[f"cl/{p}/forgetting"] = sum(max(r[l][j] for l in range(t)) - r[t][j] for j in range(t)) / t if t else None
    return out


def write(run_dir: Path, scenario: Split, matrices: dict[str, list[list[float]]], logger: RunLogger) -> None:
    """accuracy_matrix.json (both protocols' R, the experiences' classes) and, where matplotlib is installed,
    its heat map accuracy_matrix.png, also sent to W&B."""
    (run_dir / "accuracy_matrix.json").write_text(json.dumps({**matrices, **scenario.record()}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("accuracy_matrix.png needs matplotlib: pip install 'kdrun[plot]'")
        return
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(4.2 * len(PROTOCOLS), 3.6), constrained_layout=True)
    for ax, p in zip(axes, PROTOCOLS):
        r = matrices[p]
        image = ax.imshow(r, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(r):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set(title=p.replace("_", "-"), xlabel="evaluated on experience", ylabel="after training on experience",
               xticks=range(len(r[0])), yticks=range(len(r)))
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.savefig(run_dir / "accuracy_matrix.png", dpi=120)
    plt.close(fig)
    logger.image("cl/accuracy_matrix", run_dir / "accuracy_matrix.png")
