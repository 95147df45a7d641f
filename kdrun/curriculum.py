"""Curricula: what the training loader draws, changing over training; data-side, so any method composes with them.

`curriculum=NAME` instantiates one of these and the run hands it to its loader factory (`kdrun.data.Loaders`),
whose in-memory training loader asks it, batch by batch, for the epoch's draw order (`order`) and for each
training view (`view`: a uint8 batch after crop/flip in, a [0, 1] batch out, before normalisation). Before each
epoch the engine calls the loader's `set_epoch(epoch, total_epochs)`, which returns what the curriculum does in
that epoch (`curriculum/band`, `curriculum/fraction`...); the engine writes it to metrics.jsonl. All of it is a
function of the epoch alone, so a resumed run follows the same curriculum.

- `EfficientTrain` (Wang et al., ICCV 2023): low-pass crops in the frequency domain growing to the full image, and
  a RandAugment magnitude rising with them. A teacher (trained on full-size images) sees the same frequencies at
  the full size (`teacher_view`): on the shrunk image itself a digits teacher fell to chance (0.13 test accuracy at
  6 of 8 px, 0.76 on the same band at 8 px).
- `EasyFirst` (Bengio et al. 2009; pacing as in Hacohen & Weinshall, ICML 2019): the epoch's batches are drawn from
  the easiest fraction of the training images, by a teacher's (or a scorer's) loss, widening to all of them.
"""

import logging
import math

import torch
import torch.nn.functional as F

from kdrun.errors import KdrunError

log = logging.getLogger(__name__)


def low_pass_crop(x: torch.Tensor, band: int) -> torch.Tensor:
    """The lowest `band` x `band` frequencies of images `x` (..., H, W) as a `band` x `band` image: the central
    band x band of the 2-D spectrum (after fftshift) transformed back at that size, scaled by band^2 / (H W) so
    that amplitudes keep their values (a constant image stays that constant). An even band keeps frequencies
    -band/2 .. band/2 - 1, as EfficientTrain's `freq_crop` does; an odd one is symmetric. A band at least the
    image's size returns `x` as it is."""
    h, w = x.shape[-2:]
    bh, bw = min(band, h), min(band, w)
    if (bh, bw) == (h, w):
        return x
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    top, left = h // 2 - bh // 2, w // 2 - bw // 2  # the zero frequency sits at (h // 2, w // 2) after the shift
    kept = spectrum[..., top:top + bh, left:left + bw]
    return torch.fft.ifft2(torch.fft.ifftshift(kept, dim=(-2, -1))).real * (bh * bw / (h * w))


class Curriculum:
    """What a training loader asks of a curriculum; this base class changes nothing."""

    changes_images = False  # its views are not the dataset's images (the teacher-output cache then cannot stand in)

    def setup(self, data, device, eval_batch_size: int, teacher: torch.nn.Module | None = None) -> None:
        """Prepare for a run on `data` (a `kdrun.data.Data`); `teacher`: the run's trained teacher, if any."""

    def set_epoch(self, epoch: int, total_epochs: int) -> dict:
        """Move to `epoch` (0-based) of `total_epochs`; what it does in that epoch, for metrics.jsonl."""
        return {}

    def order(self, positions: torch.Tensor, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """The epoch's draw order over the training images at `positions` (batches of `batch_size`): one shuffled
        pass."""
        return positions[torch.randperm(len(positions), generator=generator).to(positions.device)]

    def view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A training view of a uint8 batch (after crop/flip): uint8, or float in [0, 1]."""
        return x

    def teacher_view(self, view: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """What the teacher sees of its training `view` (normalised) of images of `size`: the view itself."""
        return view

    def smallest_image(self, image_size: int, teacher: bool = False) -> int:
        """The smallest side of the student's (or the `teacher`'s) views of `image_size`-sided images: what that
        model must accept."""
        return image_size


class EfficientTrain(Curriculum):
    """Wang et al. (ICCV 2023), EfficientTrain: training is cut into equal segments; in segment i each training
    view is low-pass cropped (`low_pass_crop`) to `bands[i]` (in pixels of a `reference_size` image, scaled to the
    dataset's size) and RandAugment'ed (`num_ops` operations) at `magnitudes[i]` (kdrun's 0..30 scale).

    The defaults are the authors' released schedule (github.com/LeapLabTHU/EfficientTrain, ET_training.py at
    ef7d5f1c): 5 segments, B = 160, 160, 160, 192, 224 of 224 (here round(B x size / 224): 20, 20, 20, 24, 28 px
    on 28 px Fashion-MNIST), RandAugment `rand-m{2i+1}-mstd0.5-inc1`, i.e. magnitudes 1, 3, 5, 7, 9 on timm's 0..10
    scale, 3, 9, 15, 21, 27 on torchvision's 0..30 bins that kdrun's RandAugment uses (2 operations, timm's
    default). Segment i ends after int(E / 5 x (i + 1)) of E epochs (`--end_epoch`), so with E < 5 some segments get
    no epoch. The crop is their `utils.freq_crop`: the FFT's corners of B/2 (the central B x B after fftshift),
    scaled by (B / size)^2, inverse-transformed at B x B, real part. Left out: timm's magnitude noise (mstd0.5),
    the doubled batch of the early segments (a throughput trick at a fixed effective batch; kdrun keeps the batch
    and so the steps per epoch), and evaluating at the current band (kdrun evaluates full-size images).
    `teacher_full_size`: the teacher's view is the student's at the full size (`band_limited_resize`), else the
    shrunk image itself."""

    changes_images = True

    def __init__(self, bands: list[int] = (160, 160, 160, 192, 224), magnitudes: list[int] = (3, 9, 15, 21, 27),
                 reference_size: int = 224, num_ops: int = 2, teacher_full_size: bool = True):
        bands, magnitudes = [int(b) for b in bands], [int(m) for m in magnitudes]
        if not bands or len(bands) != len(magnitudes):
            raise KdrunError(f"curriculum.bands={bands} and curriculum.magnitudes={magnitudes} give the segments' "
                             "bands and RandAugment magnitudes; give one of each per segment")
        if not all(0 < b <= reference_size for b in bands) or not all(0 <= m <= 30 for m in magnitudes):
            raise KdrunError(f"curriculum.bands={bands} must lie in 1..curriculum.reference_size={reference_size} and "
                             f"curriculum.magnitudes={magnitudes} in 0..30; give values in those ranges")
        self.bands, self.magnitudes, self.reference_size, self.num_ops = bands, magnitudes, reference_size, num_ops
        self.teacher_full_size = teacher_full_size
        self.image_size = None
        self.band, self.randaugment = None, None  # this epoch's

    def setup(self, data, device, eval_batch_size, teacher=None):
        self.image_size = data.image_size

    def band_px(self, band: int, image_size: int) -> int:
        """A band of the reference size in pixels of `image_size`-sided images."""
        return max(1, round(band * image_size / self.reference_size))

    def segment(self, epoch: int, total_epochs: int) -> int:
        """The segment `epoch` (0-based) falls in: the first whose end, int(E / S x (i + 1)), is after it."""
        s = len(self.bands)
        return next(i for i in range(s) if epoch < total_epochs * (i + 1) // s or i == s - 1)

    def set_epoch(self, epoch, total_epochs):
        from kdrun.data.semi import RandAugment

        i = self.segment(epoch, total_epochs)
        self.band = self.band_px(self.bands[i], self.image_size)
        magnitude = self.magnitudes[i]
        if self.num_ops and (self.randaugment is None or self.randaugment.magnitude != magnitude):
            self.randaugment = RandAugment(self.num_ops, magnitude)
        return {"curriculum/segment": i, "curriculum/band": self.band,
                "curriculum/magnitude": magnitude if self.num_ops else 0}

    def view(self, x, generator):
        if self.randaugment is not None:
            x = self.randaugment(x, generator)
        if self.band is None or self.band >= min(x.shape[-2:]):  # None: no epoch set yet (not a training loop)
            return x
        return low_pass_crop(x.float().div_(255) if x.dtype == torch.uint8 else x, self.band)

    def smallest_image(self, image_size, teacher=False):
        if teacher and self.teacher_full_size:
            return image_size
        return min(min(self.band_px(b, image_size) for b in self.bands), image_size)

    def teacher_view(self, view, size):
        return band_limited_resize(view, size) if self.teacher_full_size else view


def pace(pacing: str, start: float, ramp: float, progress: float) -> float:
    """The fraction of the training images (the easiest) drawn from at `progress` (0..1) through training:
    `start` at 0, all of them (1) from `ramp` on; in between growing linearly, or exponentially
    (start^(1 - progress / ramp), Hacohen & Weinshall's fixed exponential pacing without its steps)."""
    t = 1.0 if ramp == 0 else min(1.0, progress / ramp)
    if pacing == "linear":
        return start + (1 - start) * t
    if pacing == "exponential":
        return start ** (1 - t)
    raise KdrunError(f"curriculum.pacing={pacing}; use linear or exponential")


@torch.no_grad()
def difficulty(model: torch.nn.Module, batches) -> torch.Tensor:
    """Each image's cross-entropy loss under `model` (eval mode), from plain `batches` that carry `index`;
    a tensor indexed by that position."""
    was_training = model.training
    model.eval()
    parts = []
    for batch in batches:
        logits = model(batch["image"])
        parts.append((batch["index"], F.cross_entropy(logits.float(), batch["label"], reduction="none")))
    model.train(was_training)
    index = torch.cat([i for i, _ in parts])
    scores = torch.full((int(index.max()) + 1,), float("nan"), device=index.device)
    scores[index] = torch.cat([s for _, s in parts])
    return scores


class EasyFirst(Curriculum):
    """Bengio et al. (ICML 2009), curriculum learning, with Hacohen & Weinshall's (ICML 2019) pacing: every
    training image gets a difficulty score once, at the start (batched, no gradients): its loss under the run's
    trained teacher, or under `scorer` (a checkpoint kdrun wrote, e.g. a pre-trained network's best.pt) when given.
    In each epoch the batches are drawn from the easiest `pace(pacing, start, ramp, epoch / epochs)` of the images
    (at least a batch of them): shuffled passes over that subset (each in whole batches, as `drop_last` does), one
    after another, until the epoch has as many batches as a pass over all the images gives, so the steps per epoch,
    and the LR schedule, stay those of the run without the curriculum."""

    def __init__(self, pacing: str = "exponential", start: float = 0.2, ramp: float = 0.5, scorer: str | None = None):
        if pacing not in ("linear", "exponential") or not 0 < start <= 1 or not 0 <= ramp <= 1:
            raise KdrunError(f"curriculum.pacing={pacing}, start={start}, ramp={ramp}; give pacing linear or "
                             "exponential, start a fraction in (0, 1] and ramp a share of the schedule in [0, 1]")
        self.pacing, self.start, self.ramp, self.scorer = pacing, start, ramp, scorer
        self.scores, self.fraction = None, 1.0

    def setup(self, data, device, eval_batch_size, teacher=None):
        from kdrun import checkpoint, data as kdata

        if self.scorer:
            model, ckpt = checkpoint.load_model(self.scorer)
            classes = ckpt["arch"].get("num_classes")
            if classes != data.num_classes:
                raise KdrunError(f"curriculum.scorer={self.scorer} predicts {classes} classes but {data.name} has "
                                 f"{data.num_classes}; give a checkpoint trained on {data.name}")
            model, what = model.to(device), f"the scorer {self.scorer}"
        elif teacher is not None:
            model, what = teacher, "the teacher"
        else:
            raise KdrunError("curriculum=easy_first ranks the training images by a trained model's loss, and this run "
                             "has no teacher; give one with curriculum.scorer=PATH (a kdrun checkpoint such as a "
                             "supervised run's checkpoints/best.pt), or use a method with a teacher (method=kd)")
        plain = kdata.Loaders(data, kdata.BatchSpec(), 1, eval_batch_size, device, seed=0)  # every rank: all images
        self.scores = difficulty(model, plain.evaluation(kdata.EvalSet("train", "train")))
        log.info("curriculum: easy_first ranked %d training images by the loss of %s (mean %.4f)",
                 len(self.scores), what, self.scores.mean().item())

    def set_epoch(self, epoch, total_epochs):
        self.fraction = pace(self.pacing, self.start, self.ramp, epoch / total_epochs)
        return {"curriculum/fraction": round(self.fraction, 6)}

    def order(self, positions, generator, batch_size):
        n = len(positions)
        k = min(n, max(math.ceil(self.fraction * n), batch_size))  # a batch of distinct images at least
        if k == n:
            return super().order(positions, generator, batch_size)
        scores = self.scores.to(positions.device)[positions]
        easiest = positions[torch.argsort(scores, stable=True)[:k]]
        whole = k // batch_size * batch_size  # each pass in whole batches, so that no batch holds an image twice
        passes = [easiest[torch.randperm(k, generator=generator).to(positions.device)[:whole]]
                  for _ in range(math.ceil(n / whole))]
        return torch.cat(passes)[:n]


def check_models(curriculum: Curriculum, data, device, **models: torch.nn.Module | None) -> None:
    """One sentence naming the fix when one of `models` (by role: student=..., teacher=...) cannot take the
    curriculum's smallest training view."""
    for role, model in models.items():
        size = curriculum.smallest_image(data.image_size, teacher=role == "teacher")
        if model is None or size == data.image_size:
            continue
        x = torch.zeros(2, data.in_chans, size, size, device=device)
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(x)
        except Exception as e:  # a fixed input size: a flattening MLP, a ViT's position embedding...
            raise KdrunError(f"the curriculum shrinks the training images to {size}x{size} px, and the {role} takes "
                             f"only {data.image_size}x{data.image_size} ({type(e).__name__}); choose a {role} that "
                             "pools globally (cnn, resnet8...) or another curriculum") from None
        finally:
            model.train(was_training)


def band_limited_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images `x` (..., h, w) at `size` (H, W) >= (h, w) by zero-padding their centred spectrum (Fourier
    interpolation): the same frequencies on a finer grid, so `band_limited_resize(low_pass_crop(x, b), (H, W))` is
    `x` with every frequency outside the central b x b removed, at its own size."""
    h, w = x.shape[-2:]
    big_h, big_w = size
    if (h, w) == (big_h, big_w):
        return x
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    top, left = big_h // 2 - h // 2, big_w // 2 - w // 2
    padded = F.pad(spectrum, (left, big_w - w - left, top, big_h - h - top))
    return torch.fft.ifft2(torch.fft.ifftshift(padded, dim=(-2, -1))).real * (big_h * big_w / (h * w))
