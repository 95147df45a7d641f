"""Li & Hoiem (ECCV 2016; TPAMI 2017), "Learning without Forgetting", under a continual scenario (`scenario=split`).

For experience i > 0, the previous model (a frozen copy of the student as experience i - 1 left it) labels the new
experience's images, and the student trains on

    L_new + lambda_o * L_old,   L_old = KL(softmax(previous_o / T) || softmax(student_o / T))   (T = 2)

(`kdrun.losses.continual.lwf_loss`: the paper's cross-entropy less a constant, no T^2). The paper's model has a
head per task; kdrun's student has one classifier over all classes, so a task's head is its classes' rows of that
classifier:

- the "old task outputs" o are the logits of the classes seen before this experience, distilled as one softmax
  over all of them (as FACIL and Mammoth concatenate the old heads);
- L_new is the cross-entropy over the experience's own classes' logits only (the active head: the new head of the
  paper, whose softmax spans the new task alone), for experience 0 too. It never pushes the old classes' logits
  down, so class-incremental accuracy comes out above the ~0.2 of van de Ven et al.'s LwF, whose new loss spans
  every class seen so far (digits, mlp, 5 epochs per experience, 3 seeds: 0.40 against 0.17 with that loss;
  task-incremental 0.96 against 0.81);
- the paper's warm-up: first `warmup_epochs` epochs training only the new head (the experience's rows of the
  classifier's weight and bias, with L_new; L_old does not depend on them) with everything else frozen, the
  network in eval mode (its BatchNorm statistics and dropout as at test time); rows the optimizer would still move
  (weight decay, momentum) are put back after each step, so every other parameter and buffer stays bit-identical.
  Then the joint training of all weights for `schedule.epochs`, with a fresh optimizer.

The previous model is a submodule (in the checkpoint, so a resumed run continues exactly), never trains
(requires_grad False, always in eval mode) and is refreshed at the first stage of each experience > 0. Where the
training images are the plain ones (held in memory, no augmentation: the teacher cache's condition for a clean
view, `kdrun.cache`) and one process trains, its logits on the experience's images are computed once, at the joint
stage's first step, and looked up by `batch["index"]` after that (not checkpointed: a resumed run computes them
again from the restored previous model), so a step costs about what fine-tuning's does; otherwise the previous
model runs at every step (one extra forward of the student).
"""

import copy

import torch
import torch.nn.functional as F

from kdrun import data as kdata, dist, features
from kdrun.data.sources import InMemory
from kdrun.errors import KdrunError
from kdrun.losses.continual import lwf_loss
from kdrun.methods.base import Method, Stage, accuracy


class LwF(Method):
    tabulates = True  # may compute the previous model's logits once per experience (LwM needs its maps per step)
    ranges = {"temperature": "(0, inf)", "lambda_o": "[0, inf)", "warmup_epochs": "[0, inf)"}

    def __init__(self, student, teacher=None, temperature: float = 2.0, lambda_o: float = 1.0, warmup_epochs: int = 1):
        super().__init__(student)
        self.temperature, self.lambda_o, self.warmup_epochs = temperature, lambda_o, warmup_epochs
        self.previous = copy.deepcopy(student).requires_grad_(False).eval()
        self.phase, self.experience = "train", 0
        self.table = None  # the previous model's logits on this experience's images, where computed once

    def setup(self, data):
        x = features.probe_input(self.student, (data.in_chans, data.image_size, data.image_size))
        spec = features.classifier_input(self.student, x, "student")
        head = features.resolve(self.student, spec, "student")
        if head.out_features != data.num_classes:
            raise KdrunError(f"{type(self).__name__} treats the student's last nn.Linear ('{spec[:-3]}') as its "
                             f"classifier, but it has {head.out_features} outputs for {data.num_classes} classes; "
                             "give a student whose last layer is its classifier")
        self.head = (head,)  # a tuple: not registered a second time as a submodule
        self.head_input = features.FeatureHooks(self.student, [spec], "student")
        train = data.splits.train
        self.n_train = len(train)
        self.plain = self.tabulates and isinstance(train, InMemory) and not kdata.train_augment(data)

    def experience_stages(self, epochs, experience):
        train = Stage("train", epochs, info={"phase": "train", "first": True})
        if experience == 0 or not self.warmup_epochs:
            return [train]
        head = [p for p in (self.head[0].weight, self.head[0].bias) if p is not None]
        return [Stage("warmup", self.warmup_epochs, params=head, info={"phase": "warmup", "first": True}),
                Stage("train", epochs, info={"phase": "train"})]

    def on_stage_start(self, stage, loop):
        info = stage.info
        name = type(self).__name__.lower()
        if "experience" not in info:
            raise KdrunError(f"method={name} learns experiences in sequence; run it with scenario=split")
        if stage.data is not None and stage.data.classes != info["classes"]:
            raise KdrunError(f"method={name} trains each experience on its own images, but scenario.cumulative=true "
                             "gives it those of earlier experiences too; use scenario.cumulative=false (the joint "
                             "bound is method=supervised scenario.cumulative=true)")
        self.experience, self.phase = info["experience"], info["phase"]
        device = self.head[0].weight.device
        self.classes = torch.tensor(info["classes"], device=device)
        self.old = torch.tensor([c for c in info["seen"] if c not in info["classes"]], dtype=torch.long, device=device)
        self.position = kdata.class_positions(self.classes, self.head[0].out_features, device)
        self.others = self.position < 0  # the rows of the classifier that are not this experience's head
        self.table = None
        if info.get("first") and self.experience > 0:  # a resumed run then loads the checkpoint's over it
            self.previous.load_state_dict(self.student.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.previous.eval()
        if self.phase == "warmup":
            self.student.eval()  # the frozen network keeps its BatchNorm statistics and drops nothing
        return self

    def step(self, batch, loop):
        if self.phase != "warmup":
            if self.experience and self.plain and self.table is None and dist.world_size() == 1:
                self.table = self.previous_table(loop)
            return super().step(batch, loop)
        head = [p for p in (self.head[0].weight, self.head[0].bias) if p is not None]
        kept = [p.detach()[self.others].clone() for p in head]
        out = super().step(batch, loop)
        with torch.no_grad():  # weight decay and momentum would move the other rows despite their zero gradient
            for p, k in zip(head, kept):
                p[self.others] = k
        return out

    def training_step(self, batch):
        x = batch["image"]
        if self.phase == "warmup":
            with torch.no_grad():
                _, (h,) = self.head_input(x)
            return self.losses(self.head[0](h), None, batch["label"])
        logits = self.student(x)
        return self.losses(logits, self.previous_outputs(batch) if self.experience else None, batch["label"])

    @torch.no_grad()
    def previous_outputs(self, batch: dict) -> torch.Tensor:
        """The previous model's logits for the batch's images: looked up where computed once, else computed."""
        if self.table is not None:
            rows, logits = self.table
            return logits[rows[batch["index"]]]
        return self.previous(batch["image"])

    @torch.no_grad()
    def previous_table(self, loop) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous model's logits on this experience's training images (plain, in order): each training-set
        position's row (-1: not this experience's), and the rows."""
        rows = torch.full((self.n_train,), -1, dtype=torch.long, device=self.classes.device)
        logits = []
        with loop.autocast():
            for b in loop.batches("train", classes=tuple(self.classes.tolist())):
                start = sum(len(x) for x in logits)
                rows[b["index"]] = torch.arange(start, start + len(b["index"]), device=rows.device)
                logits.append(self.previous(b["image"]))
        return rows, torch.cat(logits)

    def losses(self, logits, previous, labels):
        """L_new on the active head and, given the previous model's logits, lambda_o * L_old on the old classes."""
        active, target = logits[:, self.classes], self.position[labels]
        losses = {"ce": F.cross_entropy(active, target)}
        if previous is not None:
            losses["lwf"] = self.lambda_o * lwf_loss(logits[:, self.old], previous[:, self.old], self.temperature)
        return losses, {"acc": accuracy(active, target)}
