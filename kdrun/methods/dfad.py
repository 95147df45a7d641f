"""Fang, Song, Zhang, Wang & Song (2019), "Data-Free Adversarial Distillation" (DFAD; Micaelli & Storkey's
zero-shot KT, NeurIPS 2019, plays the same game).

No training image is read. A generator G (DCGAN-like, sized from the dataset's image size and channels) maps noise
z ~ N(0, I) to images; the student S learns to match the frozen teacher T on them, G learns to find where they
disagree. The discrepancy is the mean absolute difference of the logits (the paper's L1):

    student:    min_S  D(z) = |S(G(z)) - T(G(z))|_1        (G fixed)
    generator:  min_G -D(z) - balance_weight * H(p_bar)     (S fixed)

H(p_bar) is the entropy of the teacher's softmax averaged over the generated batch; `balance_weight` 0 (the
default) is DFAD's objective, > 0 adds DAFL's information-entropy term (Chen et al. 2019: weight 5 on log10, 2.2
in nats), which pushes the generator to cover every class. Without it the generator can settle on the few classes
where the student disagrees most: on Fashion-MNIST the default job's generator ends with 82% of its images in one
class (README). `train/class_entropy` logs H(p_bar) at each generator step (ln 10 = 2.30 for ten even classes).

Per step the student takes one step on a fresh batch of `size` generated images; after every `n_student_steps`
of them the generator takes one (the paper's 5 : 1). The student trains with the run's schedule; the generator
with its own Adam (`generator_lr`, cosine decay over the run), stepped through `loop.optimize` so AMP holds, and
checkpointed with the method. Nothing needs BatchNorm in the teacher, so a ViT teacher works. The generated
images of each epoch's last step are saved as `samples/epoch<k>.png`.
"""

import math

import torch
from torch import nn

from kdrun.losses.data_free import class_entropy, logit_discrepancy
from kdrun.methods.base import Stage
from kdrun.methods.data_free import DataFree


class Generator(nn.Module):
    """DAFL/DFAD's generator: z -> linear to a (2w, s/4, s/4) map, BN, then twice (2x upsampling, conv3x3, BN,
    LeakyReLU), widths 2w then w, a conv3x3 to the image's channels, tanh and a BatchNorm without affine
    parameters (the images come out standardised, as the teacher's inputs are)."""

    def __init__(self, nz: int, image_size: int, channels: int, width: int = 64):
        super().__init__()
        self.nz, self.image_size = nz, image_size
        self.init_size = math.ceil(image_size / 4)
        self.fc = nn.Linear(nz, 2 * width * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), -1, self.init_size, self.init_size)
        return self.body(x)[..., :self.image_size, :self.image_size]


class DFAD(DataFree):
    ranges = {"nz": "[1, inf)", "generator_width": "[1, inf)", "n_student_steps": "[1, inf)",
              "generator_lr": "(0, inf)", "balance_weight": "[0, inf)"}

    def __init__(self, student, teacher, nz: int = 256, generator_width: int = 64, n_student_steps: int = 5,
                 generator_lr: float = 1e-3, balance_weight: float = 0.0):
        super().__init__(student, teacher)
        self.nz, self.generator_width = nz, generator_width
        self.n_student_steps, self.generator_lr = n_student_steps, generator_lr
        self.balance_weight = balance_weight
        self.generator = None
        self.generator_optimizer = self.generator_scheduler = None

    def setup(self, data):
        super().setup(data)
        self.generator = Generator(self.nz, data.image_size, data.in_chans, self.generator_width)

    def stages(self, epochs):
        return [Stage("train", epochs, params=list(self.student.parameters()))]

    def on_stage_start(self, stage, loop):
        steps = max(1, stage.epochs * loop.steps_per_epoch // self.n_student_steps)  # the generator's, over the run
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr)
        self.generator_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.generator_optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    def sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.nz, device=self.generator.fc.weight.device)

    def student_loss(self, z: torch.Tensor) -> torch.Tensor:
        """The student's objective on codes z: D, the generator and the teacher fixed."""
        with torch.no_grad():
            x = self.generator(z)
            teacher_logits = self.teacher(x)
        return logit_discrepancy(self.student(x), teacher_logits)

    def generator_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's objective on codes z, -D - balance_weight * H(p_bar) (its gradient reaches G through the
        student and the teacher), and H(p_bar)."""
        x = self.generator(z)
        teacher_logits = self.teacher(x)
        entropy = class_entropy(teacher_logits)
        return -logit_discrepancy(self.student(x), teacher_logits) - self.balance_weight * entropy, entropy

    def step(self, batch, loop):
        z = self.sample(batch["size"])
        with loop.autocast():
            loss = self.student_loss(z)
        loop.optimize(loss)
        losses, metrics = {"l1": loss.detach()}, {}
        if (loop.step + 1) % self.n_student_steps == 0:
            with loop.autocast():
                generator_loss, entropy = self.generator_loss(self.sample(batch["size"]))
            loop.optimize(generator_loss, optimizer=self.generator_optimizer, scheduler=self.generator_scheduler,
                          params=list(self.generator.parameters()))
            metrics["generator_l1"] = -(generator_loss + self.balance_weight * entropy).detach()
            metrics["class_entropy"] = entropy.detach()
        if (loop.step + 1) % loop.steps_per_epoch == 0:  # the epoch's last step
            with torch.no_grad():
                self.save_grid(loop, self.generator(z[:100]), f"epoch{loop.epoch + 1}")
        return losses, metrics

    def get_extra_state(self):
        if self.generator_optimizer is None:
            return {}
        return {"optimizer": self.generator_optimizer.state_dict(), "scheduler": self.generator_scheduler.state_dict()}

    def set_extra_state(self, state):
        if state and self.generator_optimizer is not None:
            self.generator_optimizer.load_state_dict(state["optimizer"])
            self.generator_scheduler.load_state_dict(state["scheduler"])
