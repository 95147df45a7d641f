"""The method contract: what every method declares and does, so the engine never learns a name.

A method is an `nn.Module` holding the student, the teacher (frozen, always in eval mode) and
any trainable modules of its own. It declares what its batches carry (`batch_spec`, a
`kdrun.data.BatchSpec`); per batch it returns named losses, already weighted (the engine sums
them for the backward), and named metrics. Methods of several phases describe them as `Stage`s,
each with its own training data and evaluation sets; the engine runs them in order. Stage hooks
and a method's own `step` see the loop only through its context (`kdrun.engine.Loop`).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from kdrun.data import BatchSpec, EvalSet, Selection
from kdrun.models import keep_frozen_eval


@dataclass
class Stage:
    """One phase of training.

    `params`: the parameters trained in this stage (None: every trainable parameter of the method).
    `fresh_optimizer`: start a new optimizer and LR schedule at this stage; when False the stage
    continues the previous stage's optimizer and schedule (the schedule then spans both).
    `lr_scale`: a fresh optimizer's learning rate is the schedule's times this (e.g. a gentle fine-tuning).
    `lr`: a fresh optimizer's learning rate in place of the schedule's (None: the schedule's), times `lr_scale`.
    `data`: the training images it draws (None: the run's whole training set).
    `evaluate`: the named evaluation sets reported after its epochs (`<name>/acc`, `<name>/loss`); None: the
    run's own (`val` when the run holds validation images out, then `test`).
    """

    name: str
    epochs: int
    params: list[nn.Parameter] | None = None
    fresh_optimizer: bool = True
    lr_scale: float = 1.0
    lr: float | None = None
    data: Selection | None = None
    evaluate: tuple[EvalSet, ...] | None = None
    info: dict = field(default_factory=dict)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of a batch, as a tensor (no host sync)."""
    return (logits.argmax(1) == labels).float().mean()


def teacher_view(batch: dict) -> torch.Tensor:
    """The image the teacher sees: the batch's `teacher_image` when it has its own view, else the student's."""
    return batch.get("teacher_image", batch["image"])


class Method(nn.Module):
    """Base class: supervised-style training of `student`; subclasses add a teacher and losses."""

    needs_teacher: bool = False  # the run provides a trained teacher (checkpoint, cache or trained first)
    trains_teacher: bool = False  # the run builds an untrained teacher, which the method trains (meta pseudo labels)
    distils_ensemble: bool = False  # its teacher may be `teachers=[...]`'s Ensemble (it reads the members' logits)
    batch_spec = BatchSpec()  # what the training batches carry; a method may set its own in __init__
    teacher_cache = None  # the teacher's cached outputs (kdrun.cache.TeacherCache), handed over by the run
    # the allowed values of `__init__` options, checked before a run starts (kdrun.validate): an interval such as
    # "[0, 1]" or "(0, inf)", or choices "{1, 2}"; merged with the base classes' ranges
    ranges: dict[str, str] = {}

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
        """The phases of training for a schedule of `epochs` epochs; one stage by default. No side effects."""
        return [Stage("train", epochs)]

    def experience_stages(self, epochs: int, experience: int) -> list[Stage]:
        """Under a continual scenario (`kdrun.scenario`), the phases of training on experience `experience`
        (0, 1, ...) for `epochs` epochs; the scenario gives them the experience's data and evaluation. By default
        the method's own stages, the same for every experience."""
        return self.stages(epochs)

    def on_stage_start(self, stage: Stage, loop) -> None:
        """Called by the engine before a stage's first step."""

    def on_stage_end(self, stage: Stage, loop) -> None:
        """Called by the engine after a stage's last step."""

    def training_step(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return (losses, metrics) for one batch; the losses are summed for the backward."""
        raise NotImplementedError

    def step(self, batch: dict, loop) -> tuple[dict, dict]:
        """One optimisation step. Methods whose update is not "sum, backward, step" override this,
        using `loop.autocast()` and `loop.optimize(loss)` so AMP and gradient scaling still hold."""
        with loop.autocast():
            losses, metrics = self.training_step(batch)
        loop.optimize(sum(losses.values()))
        return losses, metrics

    def cached_teacher(self) -> nn.Module:
        """The module whose outputs on each training image the teacher cache stores (`kdrun.cache`) and
        `teacher_outputs` reads back: the teacher."""
        return self.teacher

    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> torch.Tensor:
        """The teacher's logits for the batch's teacher view, or the cached ones."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(batch)
        return self.teacher(teacher_view(batch))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        keep_frozen_eval(self)  # nor those of a student's frozen parts (student.freeze)
        return self

    def summary(self) -> dict:
        """Entries the method adds to the run's summary.json (e.g. per-iteration accuracies)."""
        return {}

    def nan_hint(self) -> str | None:
        """What in the method's settings can make its loss non-finite, for the engine's message (None: nothing
        known, and the engine names the learning rate, clipping and precision). By default a temperature (an
        attribute whose name ends in `temperature`) that is zero or negative."""
        for name, value in vars(self).items():
            if name.endswith("temperature") and isinstance(value, (int, float)) and value <= 0:
                return (f"method.{name}={value} divides the logits by {'zero' if value == 0 else 'a negative number'}; "
                        f"give a positive method.{name}")
        return None

    def eval_model(self) -> nn.Module:
        """The network evaluated and checkpointed as the result of the run."""
        return self.student
