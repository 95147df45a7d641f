"""Batches as dicts: `image` (normalised float), `label`, `index` (position in the split), and the
views a method declares (`kdrun.data.BatchSpec`, resolved here as `Views`): `teacher_image` when the
teacher sees another image than the student, `view` when the teacher's outputs come from a stored set
of views (`kdrun.cache`). A loader may draw only some of a split (`positions`); `index` stays the
position in the whole split, so per-image state (a memory bank, the teacher cache) stays valid.

`TensorLoader` is the fast path for datasets held in memory: one `index_select` per batch
and augmentation done on the whole batch, on the training device. `FolderLoader` wraps a
torch DataLoader for datasets read from files.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from kdrun.data.sources import InMemory
from kdrun.errors import KdrunError


class BatchAugment:
    """Random crop with zero padding and horizontal flip, drawn per image, applied to a uint8 batch."""

    def __init__(self, crop_padding: int = 0, flip: bool = False):
        self.crop_padding = crop_padding
        self.flip = flip

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, *self.sample(len(x), generator))

    def sample(self, b: int, generator: torch.Generator):
        """Per-image parameters (crop offsets dy, dx and flip; None where that augmentation is off)."""
        dy = dx = flip = None
        if self.crop_padding:
            dy, dx = torch.randint(0, 2 * self.crop_padding + 1, (2, b), generator=generator)
        if self.flip:
            flip = torch.rand(b, generator=generator) < 0.5
        return dy, dx, flip

    def apply(self, x: torch.Tensor, dy, dx, flip) -> torch.Tensor:
        """Crop each image at its offsets (dy, dx) in the padded image and mirror those with `flip`."""
        b, _, h, w = x.shape
        p = self.crop_padding
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = dy.to(x.device, torch.long), dx.to(x.device, torch.long)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        return x


def mixup(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Zhang et al. (ICLR 2018), mixup: lam * x + (1 - lam) * partner, one coefficient per image."""
    lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * lam + partner * (1 - lam)


class Mixer:
    """Draws mixup partners (a permutation of the batch) and coefficients ~ Beta(alpha, alpha)."""

    def __init__(self, alpha: float, generator: torch.Generator, seed: int):
        self.alpha = alpha
        self.generator = generator
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        lam = torch.from_numpy(self.rng.beta(self.alpha, self.alpha, len(x))).float()
        return mixup(x, x[perm], lam)


@dataclass(frozen=True)
class Views:
    """The views a training loader builds: a method's declaration (`kdrun.data.BatchSpec`) resolved
    against the teacher cache.

    `teacher`: what the teacher sees: the student's very image ("same"), an independently drawn view
    of the same image ("independent"), or the un-augmented image ("clean").
    `mixup_alpha`: each view (not the clean one) is mixed with a partner image, coefficient ~ Beta(alpha, alpha).
    `cached`: the teacher's outputs come from `kdrun.cache`, so no teacher image is built.
    `stored`: the teacher's view is one of a stored set; batches carry `view`, its number per image.
    """

    teacher: str = "same"
    mixup_alpha: float = 0.0
    cached: bool = False
    stored: "StoredViews | None" = None


class StoredViews:
    """K augmented views per image, recorded so that view (i, v) can be rebuilt exactly: crop offsets,
    flip, and the mixup partner and coefficient (the partner gets the same crop and flip). The teacher's
    outputs on them are computed once and cached (`kdrun.cache`)."""

    FIELDS = ("offsets", "flip", "partner", "lam")

    def __init__(self, offsets, flip, partner, lam, mixup_alpha: float):
        self.offsets, self.flip, self.partner, self.lam = offsets, flip, partner, lam
        self.mixup_alpha = mixup_alpha

    @property
    def k(self) -> int:
        return self.flip.shape[1]

    @classmethod
    def draw(cls, n: int, k: int, augment: BatchAugment, mixup_alpha: float, seed: int = 0) -> "StoredViews":
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, 2 * augment.crop_padding + 1, (n, k, 2), generator=g).to(torch.uint8)
        flip = torch.rand(n, k, generator=g) < 0.5 if augment.flip else torch.zeros(n, k, dtype=torch.bool)
        partner = (torch.arange(n)[:, None] + torch.randint(1, max(n, 2), (n, k), generator=g)) % n  # never itself
        lam = torch.ones(n, k)
        if mixup_alpha:
            lam = torch.from_numpy(np.random.default_rng(seed).beta(mixup_alpha, mixup_alpha, (n, k))).float()
        return cls(offsets, flip, partner, lam, mixup_alpha)

    def state(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def to(self, device) -> "StoredViews":
        return StoredViews(*(getattr(self, f).to(device) for f in self.FIELDS), self.mixup_alpha)

    def render(self, images: torch.Tensor, index: torch.Tensor, view: torch.Tensor, augment: BatchAugment | None,
               normalize: "Normalize") -> torch.Tensor:
        """The normalised images of views `view` of the images `index` (uint8 `images` of the whole split)."""
        offsets = self.offsets[index, view].long()
        params = (offsets[:, 0], offsets[:, 1], self.flip[index, view])

        def one(i):
            x = images.index_select(0, i)
            return normalize(augment.apply(x, *params) if augment else x)

        x = one(index)
        if self.mixup_alpha:
            x = mixup(x, one(self.partner[index, view]), self.lam[index, view])
        return x


class Normalize:
    """uint8 or [0, 1] float batch -> (x - mean) / std, per channel, in float32."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x.sub_(self.mean).div_(self.std)


class TensorLoader:
    """Iterates over an in-memory split held on `device`, a batch at a time, with the `views` declared."""

    def __init__(self, data: InMemory, batch_size: int, normalize: Normalize, device, shuffle: bool = False,
                 drop_last: bool = False, augment: BatchAugment | None = None, seed: int = 0,
                 views: Views = Views(), rank: int = 0, world_size: int = 1, positions: torch.Tensor | None = None,
                 curriculum=None):
        """With several ranks (`kdrun.dist`), `batch_size` is the global batch: every rank draws the same
        batches (one shared order and stream of random draws) and takes its slice of each, so together
        they see what a single process would. `positions`: draw only these images of `data`. `curriculum`:
        a `kdrun.curriculum.Curriculum` that chooses a shuffled loader's order and its training views."""
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.positions = positions.to(self.images.device) if positions is not None else None
        self.batch_size = min(batch_size, self.num_images) if drop_last else batch_size
        self.normalize = normalize
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment else None
        self.generator = torch.Generator().manual_seed(seed)
        self.views = views
        self.mix = Mixer(views.mixup_alpha, self.generator, seed) if views.mixup_alpha else None
        self.stored = views.stored.to(device) if views.stored is not None else None
        self.rank, self.world_size = rank, world_size
        self.curriculum = curriculum

    @property
    def num_images(self) -> int:
        return len(self.labels) if self.positions is None else len(self.positions)

    def __len__(self) -> int:
        n = self.num_images / self.batch_size
        return int(n) if self.drop_last else math.ceil(n)

    def state_dict(self) -> dict:
        """The random state the coming batches are drawn from, for resuming a run."""
        return _random_state(self.generator, self.mix)

    def load_state_dict(self, state: dict) -> None:
        _set_random_state(self.generator, self.mix, state)

    def set_epoch(self, epoch: int, total_epochs: int) -> dict:
        """Tell the curriculum (if any) which epoch of how many comes next; what it does in it, for the metrics."""
        return self.curriculum.set_epoch(epoch, total_epochs) if self.curriculum is not None else {}

    def _shard(self, batch: dict) -> dict:
        if self.world_size == 1:
            return batch
        return {k: v.tensor_split(self.world_size)[self.rank] for k, v in batch.items()}

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh draw of the training view: augmentation, normalisation, mixup within the batch."""
        if self.augment is not None:
            x = self.augment(x, self.generator)
        if self.curriculum is not None:
            x = self.curriculum.view(x, self.generator)
        x = self.normalize(x)
        return self.mix(x) if self.mix is not None else x

    def __iter__(self):
        n = self.num_images
        if self.shuffle and self.curriculum is not None:
            every = self.positions if self.positions is not None else torch.arange(n, device=self.images.device)
            order = self.curriculum.order(every, self.generator, self.batch_size)
        else:
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            order = order.to(self.images.device)
            if self.positions is not None:
                order = self.positions[order]
        teacher = self.views.teacher
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images.index_select(0, index)
            batch = {"label": self.labels.index_select(0, index), "index": index}
            if self.stored is not None:  # the teacher's view is a stored one, its outputs cached
                view = torch.randint(0, self.stored.k, (len(index),), generator=self.generator).to(index.device)
                batch["view"] = view
                batch["image"] = (self.stored.render(self.images, index, view, self.augment, self.normalize)
                                  if teacher == "same" else self._view(x))
                yield self._shard(batch)
                continue
            batch["image"] = self._view(x)
            if teacher == "independent" and not self.views.cached:
                batch["teacher_image"] = self._view(x)
            elif teacher == "clean" and not self.views.cached:
                batch["teacher_image"] = self.normalize(x)
            if self.curriculum is not None and teacher != "clean" and not self.views.cached:
                seen = batch.get("teacher_image", batch["image"])
                batch["teacher_image"] = self.curriculum.teacher_view(seen, tuple(x.shape[-2:]))
            yield self._shard(batch)


class StepClock:
    """The training loader of a method that reads no training image (`BatchSpec.reads_training_images=False`):
    `batches` batches an epoch, each `{"size": size}`, the number of images the step should make itself."""

    def __init__(self, batches: int, size: int):
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            yield {"size": self.size}

    def state_dict(self) -> dict:
        return {}  # nothing random: the method draws its images from the RNG streams the run checkpoints

    def load_state_dict(self, state: dict) -> None:
        pass


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset, transform, teacher_transform=None):
        self.dataset, self.transform, self.teacher_transform = dataset, transform, teacher_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        if self.teacher_transform is None:
            return self.transform(image), label, i
        return self.transform(image), self.teacher_transform(image), label, i


class FolderLoader:
    """A DataLoader over per-sample transforms; normalisation (and mixup) happen on the device, batched.

    `teacher_transform`: the per-sample transform of the teacher's own view, when it has one."""

    def __init__(self, dataset: Dataset, transform, batch_size: int, normalize: Normalize, device,
                 shuffle: bool = False, drop_last: bool = False, num_workers: int = 0, seed: int = 0,
                 teacher_transform=None, mixup_alpha: float = 0.0, rank: int = 0, world_size: int = 1,
                 positions: torch.Tensor | None = None):
        """`rank`, `world_size`, `positions`: as for `TensorLoader` (`batch_size` is the global batch)."""
        self.device = torch.device(device)
        self.normalize = normalize
        self.generator = generator = torch.Generator().manual_seed(seed)
        self.positions = positions.to(self.device) if positions is not None else None
        if positions is not None:
            dataset = Subset(dataset, positions.tolist())
        dataset = _Indexed(dataset, transform, teacher_transform)
        sampler = _RankSampler(len(dataset), batch_size, rank, world_size, shuffle, drop_last, generator)
        self.loader = DataLoader(
            dataset, batch_size=batch_size // world_size, sampler=sampler,
            drop_last=drop_last, num_workers=num_workers, generator=generator,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
        )
        self.mix = Mixer(mixup_alpha, torch.Generator().manual_seed(seed), seed) if mixup_alpha else None

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        """The random state the coming batches are drawn from, for resuming a run (per-sample transforms
        in worker processes draw from their own seeds, so a resumed epoch's augmentation may differ)."""
        return _random_state(self.generator, self.mix)

    def load_state_dict(self, state: dict) -> None:
        _set_random_state(self.generator, self.mix, state)

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        x = self.normalize(image.to(self.device, non_blocking=True))
        return self.mix(x) if self.mix is not None else x

    def __iter__(self):
        try:
            for *images, label, index in self.loader:
                index = index.to(self.device)
                if self.positions is not None:
                    index = self.positions[index]
                batch = {"image": self._view(images[0]), "label": label.to(self.device), "index": index}
                if len(images) == 2:
                    batch["teacher_image"] = self._view(images[1])
                yield batch
        except KdrunError as e:  # from a worker process, the DataLoader wraps the sentence in the worker's traceback
            raise KdrunError(str(e).strip().splitlines()[-1].split("KdrunError: ", 1)[-1]) from None


class _RankSampler(Sampler):
    """One rank's part of each global batch of one order shared by every rank (all of it for one rank)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, shuffle: bool, drop_last: bool,
                 generator: torch.Generator):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.shuffle, self.drop_last, self.generator = shuffle, drop_last, generator

    def __len__(self) -> int:
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        return sum(len(part) for part in self._parts(torch.arange(stop)))

    def _parts(self, order: torch.Tensor):
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size].tensor_split(self.world_size)[self.rank]

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        if self.drop_last:
            order = order[:self.n - self.n % self.batch_size]
        for part in self._parts(order):
            yield from part.tolist()


def _random_state(generator: torch.Generator, mix: "Mixer | None") -> dict:
    state = {"generator": generator.get_state()}
    if mix is not None:
        state["mixup"] = {"generator": mix.generator.get_state(), "beta": mix.rng.bit_generator.state}
    return state


def _set_random_state(generator: torch.Generator, mix: "Mixer | None", state: dict) -> None:
    generator.set_state(state["generator"])
    if mix is not None:
        mix.generator.set_state(state["mixup"]["generator"])
        mix.rng.bit_generator.state = state["mixup"]["beta"]
