"""Xie, Luong, Hovy & Le (CVPR 2020), "Self-training with Noisy Student improves ImageNet classification".

Per iteration (a `Stage`): (1) the teacher, un-noised (eval mode, no augmentation), labels the unlabeled
images: soft labels (its softmax) by default; (2) images whose confidence is below `threshold` are dropped
and the classes are balanced: a predicted class with more than K images keeps its K most confident, one
with fewer is duplicated up to K (here: weighted K / n_c); (3) a noised student (RandAugment on all its
images, `randaugment.scale=noisy_student` in conf/method/noisy_student.yaml: the authors' code's operations and
magnitude scale, M = 27; and `student.drop_rate` / `student.drop_path_rate`) trains from its initial weights on labeled +
pseudo-labeled images, the loss of `PseudoLabel`; (4) the student becomes the teacher of the next iteration.
Each iteration's teacher and student test accuracy goes to metrics.jsonl and summary.json, and each
iteration's student to checkpoints/iteration<k>.pt.

What differs from the paper: its Algorithm 1 trains the first teacher noised too; the teacher kdrun trains for
the run is trained without noise (method=supervised; a noised one can be trained with kdrun and given as
teacher.checkpoint). The paper's students are equal to or larger than their teachers (Sec. 3); a smaller student
is allowed, with a warning.
"""

import copy
import logging

import torch

from kdrun.errors import KdrunError
from kdrun.methods.base import Stage
from kdrun.methods.pseudo_label import PseudoLabel

log = logging.getLogger(__name__)


class NoisyStudent(PseudoLabel):
    ranges = {"iterations": "[1, inf)", "per_class": "[1, inf)"}

    def __init__(self, student, teacher, iterations: int = 3, hard: bool = False, threshold: float = 0.3,
                 balance: bool = True, per_class: int | None = None, unlabeled_weight: float = 1.0,
                 unlabeled_ratio: float = 3.0, randaugment: dict | None = None):
        super().__init__(student, teacher, hard, threshold, unlabeled_weight, unlabeled_ratio, randaugment,
                         noise_labeled=True)  # the student is noised on all its images
        if iterations < 1:
            raise KdrunError(f"method.iterations={iterations}; give at least 1")
        self.iterations = iterations
        sizes = [sum(p.numel() for p in m.parameters()) for m in (student, teacher)]
        if sizes[0] < sizes[1]:
            log.warning("method=noisy_student: the student (%d parameters) is smaller than the teacher (%d); Xie et "
                        "al. train an equal-or-larger student at every iteration, as it becomes the next teacher",
                        *sizes)
        self.balance = balance
        self.per_class = per_class
        # the previous iteration's student: the teacher from iteration 2 on
        self.previous = copy.deepcopy(student).requires_grad_(False).eval()
        self.initial = {k: v.clone() for k, v in student.state_dict().items()}  # each iteration's student starts here
        self.register_buffer("iteration", torch.tensor(0))  # the iteration under way (0: none yet)
        self.history: dict[str, float] = {}

    def stages(self, epochs):
        return [Stage(f"iteration{k}", epochs, params=list(self.student.parameters()), info={"iteration": k})
                for k in range(1, self.iterations + 1)]

    def on_stage_start(self, stage, loop):
        k = stage.info["iteration"]
        if k > int(self.iteration):  # a new iteration (not one resumed): the student becomes the teacher
            if k > 1:
                self.previous.load_state_dict(self.student.state_dict())
                self.student.load_state_dict(self.initial)
            self.iteration.fill_(k)
        super().on_stage_start(stage, loop)

    def on_stage_end(self, stage, loop):
        k = stage.info["iteration"]
        acc = loop.evaluate(self.student, on="test")["acc"]
        self.history[f"iteration{k}/student_acc"] = acc
        loop.log({"noisy_student/iteration": k, "noisy_student/student_acc": acc})
        loop.save(f"iteration{k}", self.student, iteration=k, test_acc=acc)

    def train(self, mode: bool = True):
        super().train(mode)
        self.previous.eval()
        return self

    def labeler(self):
        return self.teacher if int(self.iteration) <= 1 else self.previous

    def make_labels(self, loop):
        k = int(self.iteration)
        acc = loop.evaluate(self.labeler(), on="test")["acc"]
        self.history[f"iteration{k}/teacher_acc"] = acc
        stats = super().make_labels(loop)
        self.history.update({f"iteration{k}/{name}": v for name, v in stats.items()})
        loop.log({"noisy_student/iteration": k, "noisy_student/teacher_acc": acc})
        return stats

    def select(self, probs):
        """Confidence filtering, then class balancing to K images per predicted class (Xie et al., Sec. 3)."""
        weights = super().select(probs)
        if not self.balance:
            return weights
        confidence, predicted = probs.max(1)
        kept = weights > 0
        k = self.per_class or round(int(kept.sum()) / probs.shape[1])
        for c in range(probs.shape[1]):
            members = torch.nonzero(kept & (predicted == c)).squeeze(1)
            if len(members) > k:  # too many: keep the K most confident
                weights[members[confidence[members].argsort(descending=True)[k:]]] = 0
            elif len(members):  # too few: duplicate up to K
                weights[members] = k / len(members)
        return weights

    def summary(self):
        return dict(self.history)

    def get_extra_state(self):
        return {"history": dict(self.history)}

    def set_extra_state(self, state):
        self.history = dict(state["history"])
