"""Deep generative replay (DGR): Shin, Lee, Kim & Kim (NeurIPS 2017), "Continual Learning with Deep Generative
Replay", as van de Ven & Tolias set it up for Split-MNIST ("Three scenarios for continual learning", 2019).

A generator and a solver (the student). From the second experience on, every step draws a replayed batch (as many
images as the current batch) from the previous generator (a frozen copy of the generator taken when the experience
starts) and labels it with the previous solver (a frozen copy of the student taken then): by default the hard label,
the previous solver's argmax over the classes seen before this experience; with `distill=true` ("DGR+distill", van
de Ven & Tolias) its softened distribution over those classes at `temperature`. The student's loss is

    L = r * CE(current batch) + (1 - r) * L_replay,    r = 1/t for the t-th experience (van de Ven's code: the new
                                                        experience weighs as much as each old one), or `new_weight`

(Shin et al.'s r, the "ratio of mixing real data", when given); L_replay is the CE on the hard labels, or the
distillation loss `replay_distill_loss` (T^2 times the cross-entropy of the softened distributions). Following van
de Ven's class-incremental code, both terms see only the logits of the classes seen so far.

The generator is a fully connected VAE (van de Ven & Tolias's for Split-MNIST: two hidden layers of 400 ReLUs each
way, a 100-dimensional latent) rather than Shin et al.'s WGAN-GP: it is what van de Ven & Tolias's DGR numbers on
Split-MNIST were measured with, it trains stably with one loss (no critic), and it is far cheaper on a CPU. On tiny
data it is the method's weak point: on scikit-learn's 8x8 digits its prior samples are mostly one blurry class, so
the other old classes are hardly replayed (measured; see the issue-15 notes). After each solver step it takes one step (Adam, lr
`generator_lr`, betas 0.9/0.999, a constant rate, an optimizer of its own for the whole run, as van de Ven's)
on the same current batch and the same replayed images, weighted r and 1 - r: the generator learns the new data
and its own replays, so it keeps generating the old classes. It models pixels in [0, 1] as Bernoulli means
(sigmoid outputs, BCE: the likelihood of van de Ven's MNIST VAE, apt for bounded grey-scale pixels): the training
images are un-normalised with the dataset's mean and std before it sees them, and its samples normalised before
the solver does, so the solver sees replays as the loader would give real images.

Previous solver and previous generator are submodules (checkpointed; never trained: requires_grad False, always in
eval mode); the generator's optimizer is the method's extra state; the latent draws use the global RNG, which the
engine checkpoints. A resumed run is the uninterrupted one.
"""

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data import class_positions
from kdrun.errors import KdrunError
from kdrun.losses.continual import replay_distill_loss, vae_loss
from kdrun.methods.base import Method, Stage, accuracy


class VAE(nn.Module):
    """A fully connected VAE on images of `shape`: encoder D -> hidden... -> (mu, logvar) of `z_dim`, decoder
    z -> reversed hidden -> D logits, whose sigmoid is the image (pixels in [0, 1])."""

    def __init__(self, shape: tuple[int, ...], hidden: tuple[int, ...] = (400, 400), z_dim: int = 100):
        super().__init__()
        self.shape, self.z_dim = tuple(shape), z_dim
        widths = [math.prod(shape), *hidden]
        self.encoder = nn.Sequential(nn.Flatten(), *_mlp(widths))
        self.mu, self.logvar = nn.Linear(widths[-1], z_dim), nn.Linear(widths[-1], z_dim)
        self.decoder = nn.Sequential(*_mlp([z_dim, *reversed(widths[1:])]), nn.Linear(widths[1], widths[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reconstruction's logits of x (pixels in [0, 1]) through z ~ q(z|x), and q's mu and logvar."""
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(len(z), *self.shape)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images (pixels in [0, 1]) decoded from z ~ N(0, I)."""
        z = torch.randn(n, self.z_dim, device=self.mu.weight.device)
        return torch.sigmoid(self.decode(z))


def _mlp(widths: list[int]) -> list[nn.Module]:
    return [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]


class DGR(Method):
    ranges = {"temperature": "(0, inf)", "new_weight": "(0, 1]", "z_dim": "[1, inf)", "generator_lr": "(0, inf)"}

    def __init__(self, student, teacher=None, distill: bool = False, temperature: float = 2.0,
                 new_weight: float | None = None, z_dim: int = 100, hidden: list[int] = (400, 400),
                 generator_lr: float = 1e-3):
        super().__init__(student)
        self.distill, self.temperature, self.new_weight = distill, temperature, new_weight
        self.z_dim, self.hidden, self.generator_lr = z_dim, tuple(hidden), generator_lr
        self.previous_solver = copy.deepcopy(student).requires_grad_(False).eval()
        self.experience = 0
        self.seen = self.lookup = None  # the classes seen so far (old ones first) and each class's position there
        self.old = 0  # how many of them are old (seen before this experience)

    def setup(self, data):
        self.num_classes = data.num_classes
        self.generator = VAE((data.in_chans, data.image_size, data.image_size), self.hidden, self.z_dim)
        self.previous_generator = copy.deepcopy(self.generator).requires_grad_(False).eval()
        shape = (1, data.in_chans, 1, 1)
        self.register_buffer("mean", torch.tensor(data.mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(data.std, dtype=torch.float32).view(shape), persistent=False)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr,
                                                    betas=(0.9, 0.999))  # at a constant rate

    def stages(self, epochs):
        return [Stage("train", epochs, params=list(self.student.parameters()))]  # the generator has its own optimizer

    def on_stage_start(self, stage, loop):
        if "experience" not in stage.info:
            raise KdrunError("method=dgr replays earlier experiences of a continual scenario; run it with "
                             "scenario=split")
        self.experience = stage.info["experience"]
        classes, seen = stage.info["classes"], stage.info["seen"]
        old = [c for c in seen if c not in classes]
        device = self.mean.device
        self.old, self.seen = len(old), torch.tensor(old + list(classes), device=device)
        self.lookup = class_positions(self.seen, self.num_classes, device)
        if self.experience > 0:  # (a resumed experience gets the checkpoint's copies next)
            self.previous_solver.load_state_dict(self.student.state_dict())
            self.previous_generator.load_state_dict(self.generator.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.previous_solver.eval()
        if hasattr(self, "previous_generator"):
            self.previous_generator.eval()
        return self

    @torch.no_grad()
    def replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n replayed images: the previous generator's samples (pixels in [0, 1]), the same normalised, and the
        previous solver's logits on them over the old classes (in the order of `self.seen`)."""
        pixels = self.previous_generator.sample(n)
        images = (pixels - self.mean) / self.std
        return pixels, images, self.previous_solver(images)[:, self.seen[:self.old]]

    def step(self, batch, loop):
        x, y = batch["image"], batch["label"]
        r = self.new_weight if self.new_weight is not None else 1 / (self.experience + 1)
        replaying = self.experience > 0
        with loop.autocast():
            logits = self.student(x)[:, self.seen]
            losses = {"ce": F.cross_entropy(logits, self.lookup[y])}
            if replaying:
                pixels, images, previous = self.replay(len(y))
                replayed = self.student(images)[:, self.seen]
                losses["replay"] = (1 - r) * (replay_distill_loss(replayed, previous, self.temperature) if self.distill
                                              else F.cross_entropy(replayed, previous.argmax(1)))
                losses["ce"] = r * losses["ce"]
        loop.optimize(sum(losses.values()))
        with loop.autocast():
            vae = vae_loss(*self._reconstruct(x * self.std + self.mean))
            if replaying:
                vae = r * vae + (1 - r) * vae_loss(*self._reconstruct(pixels))
        loop.optimize(vae, optimizer=self.generator_optimizer, params=list(self.generator.parameters()))
        return {**losses, "vae": vae.detach()}, {"acc": accuracy(logits, self.lookup[y])}

    def _reconstruct(self, pixels: torch.Tensor):
        pixels = pixels.clamp(0, 1)
        return (pixels, *self.generator(pixels))

    def get_extra_state(self):
        return {"optimizer": self.generator_optimizer.state_dict()}

    def set_extra_state(self, state):
        self.generator_optimizer.load_state_dict(state["optimizer"])
