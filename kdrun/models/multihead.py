"""A classifier with several linear heads on one shared feature (representation consolidation's student)."""

import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.features import INPUT_SUFFIX, FeatureHooks


class MultiHead(nn.Module):
    """`body`, a classifier whose last nn.Linear is `classifier` (its module path), with one linear head per label
    space on that Linear's input (the shared feature): head k has `classes[k]` outputs. Head `task` IS `body`'s own
    classifier, so `body` alone stays a plain classifier of the task (what is evaluated and checkpointed); the
    other heads are new nn.Linear layers. `task_outputs`: the classifier's outputs that are the task head's, in its
    order (None: all of them), when `body` classifies more classes than the task has. `forward` gives every head's
    logits, in order."""

    def __init__(self, body: nn.Module, classifier: str, classes: list[int], task: int,
                 task_outputs: list[int] | None = None):
        super().__init__()
        head = body.get_submodule(classifier)
        outputs = head.out_features if isinstance(head, nn.Linear) else None
        if task_outputs is None:
            fits = outputs == classes[task]
        else:
            fits = outputs is not None and len(task_outputs) == classes[task] and max(task_outputs) < outputs
        if not fits:
            raise KdrunError(f"the student's classifier {classifier} gives {outputs or '?'} outputs but its task head "
                             f"needs {classes[task]}; give a task teacher of the run's dataset's classes, or name "
                             "its classes among the dataset's (method.task_classes)")
        self.body, self.task, self.classifier = body, task, classifier
        self.task_outputs = list(task_outputs) if task_outputs is not None else None
        self.heads = nn.ModuleList(head if k == task else nn.Linear(head.in_features, n)
                                   for k, n in enumerate(classes))
        self._features = FeatureHooks(body, [classifier + INPUT_SUFFIX], role="student")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, (feature,) = self._features(x)
        if self.task_outputs is not None:
            out = out[:, self.task_outputs]
        return [out if k == self.task else head(feature) for k, head in enumerate(self.heads)]


class Concat(nn.Module):
    """Several models as one: `forward` gives their logits side by side, (B, sum of their class counts), what the
    teacher cache stores for them; `split` cuts such a tensor back into each model's logits."""

    def __init__(self, members: list[nn.Module], classes: list[int], names: list[str]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.classes = list(classes)
        self.name = "+".join(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(logits, self.classes, dim=1)
