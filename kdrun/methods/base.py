"""The method contract: what every method declares and does, so the engine never learns a name.

A method is an `nn.Module` holding the student, the teacher (frozen, always in eval mode) and
any trainable modules of its own. Per batch it returns named losses, already weighted (the
engine sums them for the backward), and named metrics. Methods of several phases describe
them as `Stage`s; the engine runs them in order.
"""

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Stage:
    """One phase of training.

    `params`: the parameters trained in this stage (None: every trainable parameter of the method).
    `fresh_optimizer`: start a new optimizer and LR schedule at this stage; when False the stage
    continues the previous stage's optimizer and schedule (the schedule then spans both).
    `lr_scale`: a fresh optimizer's learning rate is the schedule's times this (e.g. a gentle fine-tuning).
    """

    name: str
    epochs: int
    params: list[nn.Parameter] | None = None
    fresh_optimizer: bool = True
    lr_scale: float = 1.0
    info: dict = field(default_factory=dict)


class Method(nn.Module):
    """Base class: supervised-style training of `student`; subclasses add a teacher and losses."""

    needs_teacher: bool = False
    teacher_input: str = "same"  # the teacher sees the student's "same" image, an "independent" view or the "clean" one
    mixup_alpha: float = 0.0  # mixup on the training views, done by the data side (kdrun.data.Views)
    teacher_cacheable: bool = False  # only the teacher's logits are used, so kdrun.cache may stand in for it
    teacher_cache = None  # set by kdrun.cache (teacher.cache=true): teacher_outputs reads it instead
    trains_teacher: bool = False  # the teacher starts untrained and the method trains it (meta pseudo labels)
    unlabeled = None  # a kdrun.data.semi.Stream when the method also trains on unlabeled batches
    engine = None  # the Engine running the method, set by it: hooks reach its loaders, evaluation and logger

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def setup(self, data) -> None:
        """Called once by `kdrun.run` with the dataset (`kdrun.data.Data`) before training, to build what
        depends on it (feature connectors sized by a probe forward, a memory bank per training sample)."""

    def stages(self, epochs: int) -> list[Stage]:
        """The phases of training for a schedule of `epochs` epochs; one stage by default."""
        return [Stage("train", epochs)]

    def on_stage_start(self, stage: Stage) -> None:
        """Called by the engine before a stage's first step."""

    def on_stage_end(self, stage: Stage) -> None:
        """Called by the engine after a stage's last step."""

    def training_step(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return (losses, metrics) for one batch; the losses are summed for the backward."""
        raise NotImplementedError

    def step(self, batch: dict, engine) -> tuple[dict, dict]:
        """One optimisation step. Methods whose update is not "sum, backward, step" override this,
        using `engine.autocast()` and `engine.optimize(loss)` so AMP and gradient scaling still hold."""
        with engine.autocast():
            losses, metrics = self.training_step(batch)
        engine.optimize(sum(losses.values()))
        return losses, metrics

    def cached_teacher(self) -> nn.Module:
        """The module whose outputs on each training image the teacher cache stores (`kdrun.cache`) and
        `teacher_outputs` reads back: the teacher."""
        return self.teacher

    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> torch.Tensor:
        """The teacher's logits for the batch's teacher view (`teacher_image`, else `image`), or the cached ones."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(batch)
        return self.teacher(batch.get("teacher_image", batch["image"]))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def summary(self) -> dict:
        """Entries the method adds to the run's summary.json (e.g. per-iteration accuracies)."""
        return {}

    def eval_model(self) -> nn.Module:
        """The network evaluated and checkpointed as the result of the run."""
        return self.student
