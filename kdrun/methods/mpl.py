"""Pham, Dai, Xie, Luong & Le (CVPR 2021), "Meta Pseudo Labels".

The teacher starts untrained and learns beside the student. Per step, on a labeled batch (x_l, y_l) and
an unlabeled batch x_u (RandAugment-ed; conf/method/mpl.yaml: `randaugment.scale=mpl`, the authors' augment.py
operations and magnitude scale, augment_magnitude M = 16):

1. the teacher's pseudo labels are sampled, y^_u ~ T(x_u; theta_T) (`pseudo_labels=sample`, the paper's; `argmax`
   takes the teacher's most likely class instead), and the student takes one step on them:
   theta'_S = theta_S - eta_S * grad CE(y^_u, S(x_u; theta_S))                          (Sec. 3.1)
2. the student's feedback h is how much that step lowered its labeled loss, h > 0 when it did. The paper's
   Eq. 12 is its first-order estimate for an SGD step theta'_S = theta_S - eta_S * g_u (`feedback=first_order`):
   h = eta_S * grad_{theta'_S} CE(y_l, S(x_l; theta'_S)) . g_u,  g_u = grad_{theta_S} CE(y^_u, S(x_u; theta_S)).
   Any other optimizer's step (Adam's is preconditioned) is not -eta_S * g_u, and the estimate can then have the
   wrong sign, so `first_order` refuses a non-SGD student; momentum's first steps are larger than eta_S * g_u too.
   The default, `feedback=difference`, measures what the actual step did, as the authors' released code does:
   h = CE(y_l, S(x_l; theta_S)) - CE(y_l, S(x_l; theta'_S)), the first term from the same forward as the step's
   loss (labeled and unlabeled images in one batch, as theirs), right for any optimizer. Their code centres h by
   a moving average (`feedback_baseline`, their 0.01: m <- m + 0.01 (h - m), h <- h - m; 0 here by default), and
   its sign is the opposite of Eq. 12's (the teacher's loss is their (new - old) times its CE; a known point of
   their tracker's discussion): kdrun follows the paper's sign;
3. the teacher descends  h * CE(y^_u, T(x_u))  (reinforcing y^_u when h > 0, Eq. 12), plus its own
   supervised CE(y_l, T(x_l)) (label smoothing) and, with `uda_weight`, UDA's consistency loss (Xie et al.
   2020): CE(sharpen(T(weak x_u), uda_temperature), T(x_u)) on the images whose un-sharpened confidence
   reaches `uda_threshold`, its weight ramped up linearly over the first `uda_ramp` of the stage.

Stages: "wait", the first `student_wait` of the epochs (rounded), where only the teacher learns (from the
labeled data and UDA; the student's learning rate is 0, so h = 0); "mpl", where the student's own LR schedule
(warm-up, decay) starts; "finetune", the student on labeled data alone at `finetune_lr_scale` times the
schedule's rate. Two optimizers and LR schedules, both stepped through `loop.optimize` so AMP holds: the
engine's for the student, a stage at a time, and the method's own for the teacher, over "wait" and "mpl".
Not here, of the authors' code: an EMA of the student for evaluation (`trainer.ema_decay` gives one).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data import BatchSpec
from kdrun.data.semi import Stream
from kdrun.errors import KdrunError
from kdrun.methods.base import Method, Stage, accuracy

FEEDBACKS = ("difference", "first_order")


def feedback(labeled_grads, unlabeled_grads, lr: float) -> torch.Tensor:
    """h of Eq. 12: lr * <grad of the updated student's labeled loss, grad of its unlabeled loss>."""
    dot = sum((a.float() * b.float()).sum() for a, b in zip(labeled_grads, unlabeled_grads)
              if a is not None and b is not None)
    return lr * torch.as_tensor(dot)


class MPL(Method):
    ranges = {"unlabeled_ratio": "(0, inf)", "label_smoothing": "[0, 1]", "uda_weight": "[0, inf)",
              "uda_temperature": "(0, inf)", "uda_threshold": "[0, 1]", "uda_ramp": "[0, 1)",
              "student_wait": "[0, 1)", "finetune_epochs": "[0, inf)", "finetune_lr_scale": "(0, inf)",
              "feedback_baseline": "[0, 1]"}
    trains_teacher = True

    def __init__(self, student, teacher, unlabeled_ratio: float = 7.0, randaugment: dict | None = None,
                 label_smoothing: float = 0.15, uda_weight: float = 8.0, uda_temperature: float = 0.7,
                 uda_threshold: float = 0.6, uda_ramp: float = 0.017, student_wait: float = 0.01,
                 finetune_epochs: int = 1, finetune_lr_scale: float = 0.1, pseudo_labels: str = "sample",
                 feedback: str = "difference", feedback_baseline: float = 0.0):
        super().__init__(student, teacher)
        if pseudo_labels not in ("sample", "argmax"):
            raise KdrunError(f"method.pseudo_labels={pseudo_labels}; use sample (the paper's) or argmax")
        if feedback not in FEEDBACKS:
            raise KdrunError(f"method.feedback={feedback}; use difference (any optimizer) or first_order (Eq. 12, SGD)")
        self.feedback, self.feedback_baseline = feedback, feedback_baseline
        self.register_buffer("h_mean", torch.zeros(()))  # the moving average that centres h (feedback_baseline)
        self.pseudo_labels = pseudo_labels
        for name, value in (("uda_ramp", uda_ramp), ("student_wait", student_wait)):
            if not 0 <= value < 1:
                raise KdrunError(f"method.{name}={value}; give a fraction of the schedule's epochs in [0, 1)")
        teacher.requires_grad_(True)
        self.batch_spec = BatchSpec(unlabeled=Stream(unlabeled_ratio, dict(randaugment) if randaugment else None,
                                                     weak_view=uda_weight > 0))
        self.label_smoothing = label_smoothing
        self.uda_weight, self.uda_temperature, self.uda_threshold = uda_weight, uda_temperature, uda_threshold
        self.uda_ramp, self.student_wait = uda_ramp, student_wait
        self.uda_steps = 0  # set from the schedule's length
        self.finetune_epochs, self.finetune_lr_scale = finetune_epochs, finetune_lr_scale
        self.teacher_optimizer = self.teacher_scheduler = None
        self._teacher_state = None  # the teacher's optimizer state, loaded before the optimizer exists
        self.teacher_acc = None  # the teacher's test accuracy after the MPL stage
        self.phase = "mpl"

    def stages(self, epochs):
        params = list(self.student.parameters())
        wait = round(self.student_wait * epochs)
        stages = [Stage("wait", wait, params=params, info={"teacher_epochs": epochs}),
                  Stage("mpl", epochs - wait, params=params, info={"teacher_epochs": epochs}),
                  Stage("finetune", self.finetune_epochs, params=params, lr_scale=self.finetune_lr_scale)]
        return [s for s in stages if s.epochs]

    def on_stage_start(self, stage, loop):
        self.phase = stage.name
        if stage.name == "mpl" and self.feedback == "first_order" and not isinstance(loop.optimizer, torch.optim.SGD):
            raise KdrunError(f"method.feedback=first_order is Eq. 12's estimate for an SGD student, but this one trains "
                             f"with {type(loop.optimizer).__name__}; use method.feedback=difference, or an SGD schedule "
                             "(schedule=sgd_cosine)")
        if stage.name != "finetune" and self.teacher_optimizer is None:  # one schedule over "wait" and "mpl"
            epochs = stage.info["teacher_epochs"]
            self.uda_steps = round(self.uda_ramp * epochs * loop.steps_per_epoch)
            self.teacher_optimizer, self.teacher_scheduler = loop.make_optimizer(list(self.teacher.parameters()), epochs)
            if self._teacher_state is not None:
                self.set_extra_state(self._teacher_state)

    def on_stage_end(self, stage, loop):
        if stage.name == "mpl":
            self.teacher_acc = loop.evaluate(self.teacher, on="test")["acc"]
            loop.log({"mpl/teacher_test_acc": self.teacher_acc})

    def summary(self):
        return {"mpl/teacher_test_acc": self.teacher_acc}

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)  # the teacher trains too: its dropout and BatchNorm are on
        return self

    def training_step(self, batch):  # the fine-tuning stage: the student on labeled data
        logits = self.student(batch["image"])
        return ({"ce": F.cross_entropy(logits, batch["label"])},
                {"acc": accuracy(logits, batch["label"])})

    def step(self, batch, loop):
        if self.phase == "finetune":
            return super().step(batch, loop)
        x, y, u = batch["image"], batch["label"], batch["unlabeled_image"]
        n, m = len(x), len(u)
        views = [x, u] + ([batch["unlabeled_weak_image"]] if self.uda_weight else [])
        with loop.autocast():
            t_logits = self.teacher(torch.cat(views))
            t_x, t_u = t_logits[:n], t_logits[n:n + m]
            teacher_losses = {"teacher_ce": F.cross_entropy(t_x, y, label_smoothing=self.label_smoothing)}
            if self.uda_weight:
                teacher_losses["teacher_uda"] = self._uda(t_logits[n + m:].detach().float(), t_u.float(), loop.step)
        probs = F.softmax(t_u.detach().float(), dim=1)
        pseudo = torch.multinomial(probs, 1).squeeze(1) if self.pseudo_labels == "sample" else probs.argmax(1)
        losses, h = {}, torch.zeros((), device=x.device)  # "wait": the student does not learn yet
        if self.phase == "mpl":
            losses["student"], h = self._student_step(loop, u, pseudo, x, y)
            with loop.autocast():
                teacher_losses["teacher_mpl"] = h * F.cross_entropy(t_u, pseudo)
        loop.optimize(sum(teacher_losses.values()), optimizer=self.teacher_optimizer, scheduler=self.teacher_scheduler)
        losses.update({k: v.detach() for k, v in teacher_losses.items()})
        return losses, {"h": h, "teacher_acc": accuracy(t_x, y)}

    def _student_step(self, loop, u, pseudo, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's step on the pseudo labels; its loss, and h (see the module's docstring), centred."""
        h_fn = self._difference if self.feedback == "difference" else self._first_order
        loss, h = h_fn(loop, u, pseudo, x, y)
        h = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)  # a skipped fp16 step
        if self.feedback_baseline:
            self.h_mean += self.feedback_baseline * (h - self.h_mean)
            h = h - self.h_mean
        return loss, h

    def _difference(self, loop, u, pseudo, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """h = the student's labeled loss before its step less after it."""
        with loop.autocast():
            logits = self.student(torch.cat([x, u]))
            loss = F.cross_entropy(logits[len(x):], pseudo)
        before = F.cross_entropy(logits[:len(x)].detach().float(), y)
        loop.optimize(loss)
        with torch.no_grad():
            after = F.cross_entropy(self.student(x).float(), y)
        return loss.detach(), before - after

    def _first_order(self, loop, u, pseudo, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """h of Eq. 12, from the gradients around the step."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        with loop.autocast():
            loss = F.cross_entropy(self.student(u), pseudo)
        lr = loop.lr  # eta_S of this step
        loop.optimize(loss)  # theta_S -> theta'_S
        unlabeled_grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
        labeled_loss = F.cross_entropy(self.student(x).float(), y)  # in float32: the gradient enters h unscaled
        labeled_grads = torch.autograd.grad(labeled_loss, params, allow_unused=True)
        return loss.detach(), feedback(labeled_grads, unlabeled_grads, lr)

    def _uda(self, weak: torch.Tensor, strong: torch.Tensor, step: int) -> torch.Tensor:
        """UDA's consistency loss on the teacher: sharpened weak-view targets, confidence-masked, ramped up."""
        target = F.softmax(weak / self.uda_temperature, dim=1)
        mask = (F.softmax(weak, dim=1).max(1).values >= self.uda_threshold).float()
        loss = (mask * -(target * F.log_softmax(strong, dim=1)).sum(1)).mean()
        return self.uda_weight * min(1.0, (step + 1) / max(1, self.uda_steps)) * loss

    def get_extra_state(self):
        if self.teacher_optimizer is None:
            return {"teacher_acc": self.teacher_acc}
        return {"teacher_acc": self.teacher_acc, "optimizer": self.teacher_optimizer.state_dict(),
                "scheduler": self.teacher_scheduler.state_dict()}

    def set_extra_state(self, state):
        self.teacher_acc = state.get("teacher_acc")
        if "optimizer" not in state:
            return
        if self.teacher_optimizer is None:
            self._teacher_state = state
            return
        self.teacher_optimizer.load_state_dict(state["optimizer"])
        self.teacher_scheduler.load_state_dict(state["scheduler"])
        self._teacher_state = None
