"""Beyer et al. (CVPR 2022), "Knowledge distillation: A good teacher is patient and consistent" (FunMatch).

The student matches the teacher's function: KL(teacher || student) between their outputs on an input,
no labels. What the teacher sees is the point of the paper, `teacher_view`:
- `fixed`: the teacher's output on the un-augmented image (computed once: what a precomputed cache gives),
  the student sees augmented views;
- `independent`: teacher and student see independently augmented views of the image;
- `consistent`: both see the very same augmented image;
- `function_matching`: consistent, plus mixup between images with the same partners and coefficients for
  both networks (`mixup_alpha`); the paper's best, given long ("patient") schedules.
The data side builds these views from the method's declaration (its `batch_spec`).

Mixup here differs from the authors' big_vision code in how it draws: kdrun gives every image its own partner (a
permutation of the batch) and its own coefficient lambda ~ Beta(mixup_alpha, mixup_alpha); big_vision's `mixup`
(fold_in None, n = 2) draws one coefficient for the whole batch, puts the larger share on each image's own
pixels, and mixes image i with image i - 1 (a roll of the batch). kdrun draws per image so that a teacher cache
can store each mixed view's output (a view is then a property of its image, not of the batch it fell into); the
set of images mixed and the Beta(1, 1) law of the shares are the same, the batch's spread of shares is not.
"""

from kdrun.data import BatchSpec
from kdrun.errors import KdrunError
from kdrun.losses import kd_loss
from kdrun.methods.base import Method

TEACHER_INPUT = {"fixed": "clean", "independent": "independent", "consistent": "same", "function_matching": "same"}


class FunMatch(Method):
    ranges = {"mixup_alpha": "[0, inf)", "temperature": "(0, inf)"}
    needs_teacher = True

    def __init__(self, student, teacher, teacher_view: str = "function_matching", mixup_alpha: float = 1.0,
                 temperature: float = 1.0):
        super().__init__(student, teacher)
        if teacher_view not in TEACHER_INPUT:
            raise KdrunError(f"unknown method.teacher_view '{teacher_view}'; use one of {', '.join(TEACHER_INPUT)}")
        self.teacher_view = teacher_view
        self.batch_spec = BatchSpec(TEACHER_INPUT[teacher_view], mixup_alpha if teacher_view == "function_matching" else 0.0,
                                    cacheable=True)
        self.temperature = temperature

    def training_step(self, batch):
        logits = self.student(batch["image"])
        teacher_logits = self.teacher_outputs(batch)
        agreement = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        return {"kl": kd_loss(logits, teacher_logits, self.temperature)}, {"agreement": agreement}
