"""Semi-supervised data: a labeled/unlabeled split of the training set, the unlabeled stream that
flows beside the labeled batches, and RandAugment for the students' strong noise.

`dataset.labeled_per_class=N` (or `dataset.labeled_fraction=F`) keeps N images (a fraction F) of
every class labeled, drawn with `dataset.split_seed`; the rest of the training set becomes unlabeled.
Every method then trains on the labeled part (a cached teacher included); methods that declare an
unlabeled `Stream` also get, per step, `unlabeled_ratio` x batch_size unlabeled images:

    batch = {"image", "label", "index",                  # labeled, as always
             "unlabeled_image", "unlabeled_index",       # the student's view of unlabeled images
             "unlabeled_weak_image"}                     # crop/flip only, when the method asks (UDA)

`unlabeled_index` is the position in the unlabeled part, so a method can keep per-image pseudo labels.
An epoch stays one pass over the labeled images; the unlabeled stream runs on across epochs.
"""

import math
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset, Subset

from kdrun.data.loaders import BatchAugment, Normalize, TensorLoader
from kdrun.data.sources import InMemory
from kdrun.errors import KdrunError


# ---- the split ---------------------------------------------------------------------------------------

def stratified(labels: torch.Tensor, fraction: float, seed: int, asked: str, kept: str = "unlabeled",
               per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified, seeded split of positions 0..len(labels)-1: (chosen, rest), each sorted; of every class,
    `per_class` images or `fraction` of them (at least one) are chosen, and at least one is left. `asked` names
    the setting and `kept` the rest, for the error when a class would be left empty."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n = per_class if per_class is not None else max(1, round(fraction * len(members)))
        if n >= len(members):
            raise KdrunError(f"{asked} takes all {len(members)} training images of class {c} and leaves none "
                             f"{kept}; take at most {len(members) - 1} per class")
        chosen.append(members[:n])
    chosen = torch.cat(chosen).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[chosen] = False
    return chosen, torch.nonzero(mask).squeeze(1)


def split_indices(labels: torch.Tensor, labeled_per_class: int | None = None, labeled_fraction: float | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of positions 0..len(labels)-1: (labeled, unlabeled), each sorted."""
    if (labeled_per_class is None) == (labeled_fraction is None):
        raise KdrunError("give one of dataset.labeled_per_class and dataset.labeled_fraction, not both")
    if labeled_fraction is not None and not 0 < labeled_fraction < 1:
        raise KdrunError(f"dataset.labeled_fraction={labeled_fraction}; give a fraction between 0 and 1")
    if labeled_per_class is not None and labeled_per_class < 1:
        raise KdrunError(f"dataset.labeled_per_class={labeled_per_class}; give at least 1")
    asked = (f"dataset.labeled_per_class={labeled_per_class}" if labeled_per_class is not None
             else f"dataset.labeled_fraction={labeled_fraction}")
    return stratified(labels, labeled_fraction, seed, asked, per_class=labeled_per_class)


@dataclass
class LabeledSplit:
    """The labeled/unlabeled split of a training set; `unlabeled` keeps its labels for diagnostics only."""

    labeled_index: torch.Tensor  # positions in the training set (less any validation images); the rest is unlabeled
    unlabeled: InMemory | Dataset
    config: dict

    def record(self) -> dict:
        """The split as plain data: its settings and the labeled positions (the unlabeled are the rest)."""
        labels = labels_of(self.unlabeled)
        return {**self.config, "num_labeled": len(self.labeled_index), "num_unlabeled": len(labels),
                "unlabeled_per_class": torch.bincount(labels).tolist(), "labeled_index": self.labeled_index.tolist()}


def labels_of(part: InMemory | Dataset) -> torch.Tensor:
    """The labels of a split, in memory or a (sub)set of a torchvision dataset."""
    if isinstance(part, InMemory):
        return part.labels
    if isinstance(part, Subset):
        return torch.as_tensor(part.dataset.targets)[torch.as_tensor(part.indices)]
    return torch.as_tensor(part.targets)


def part(train: InMemory | Dataset, index: torch.Tensor) -> InMemory | Dataset:
    """The images of `train` at positions `index`."""
    if isinstance(train, InMemory):
        return InMemory(train.images[index], train.labels[index])
    return Subset(train, index.tolist())


def split(data, cfg):
    """`data` (a `kdrun.data.Data`) with its training set cut to the labeled part, when `cfg` (the
    `dataset` group) asks for a split; the unlabeled part goes to `data.labeled_split`."""
    per_class, fraction = cfg.get("labeled_per_class"), cfg.get("labeled_fraction")
    if per_class is None and fraction is None:
        return data
    train = data.splits.train
    seed = int(cfg.get("split_seed") or 0)
    labeled, unlabeled = split_indices(labels_of(train), per_class, fraction, seed)
    config = {"labeled_per_class": per_class, "labeled_fraction": fraction, "split_seed": seed}
    splits = replace(data.splits, train=part(train, labeled))
    return replace(data, splits=splits, labeled_split=LabeledSplit(labeled, part(train, unlabeled), config))


# ---- RandAugment -------------------------------------------------------------------------------------
SCALES = ("torchvision", "noisy_student", "mpl")

# The authors' RandAugment, from their released code: Noisy Student (google-research/noisystudent randaugment.py,
# as tensorflow/tpu models/official/efficientnet/autoaugment.py `distort_image_with_randaugment`) and MPL
# (google-research meta_pseudo_labels/augment.py `RandAugment`). A level M maps linearly to each operation's
# argument, M / 10 of its value at 10 (`_MAX_LEVEL`); M beyond 10 extrapolates (Noisy Student's M = 27).
# name -> (argument at M = 10, signed: negated for half the images); None: the operation takes no argument.
AUTHORS_OPS = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": (30.0, True),                     # degrees
    "Posterize": (4, False),                    # bits kept, int(); fewer bits (a harsher op) at a smaller M
    "Solarize": (256, False),                   # threshold, int(); inverts less at a larger M, nothing from 256 up
    "Color": (1.8, False), "Contrast": (1.8, False), "Brightness": (1.8, False), "Sharpness": (1.8, False),
    "ShearX": (0.3, True), "ShearY": (0.3, True),  # the shear coefficient (1, s; 0, 1) about the top-left corner
    "TranslateX": ("translate", True), "TranslateY": ("translate", True),  # pixels
    "Cutout": ("cutout", False),                # pixels, int(): a 2c x 2c square of grey (128) at a random centre
    "SolarizeAdd": (110, False),                # int(): added to the pixels below 128
}
ENHANCE = {"Color", "Contrast", "Brightness", "Sharpness"}  # factor M / 10 * 1.8 + 0.1 (1: the image itself)
# Noisy Student's 16 operations, each applied when drawn; MPL's 15 (no SolarizeAdd), each drawn operation applied
# with a probability p ~ U(0.2, 0.8) drawn once per image.
AUTHORS_LISTS = {"noisy_student": list(AUTHORS_OPS),
                 "mpl": [op for op in AUTHORS_OPS if op != "SolarizeAdd"]}
FILL = 128  # the authors' `replace` value for the pixels geometric operations and cutout leave empty


def authors_constants(size: int) -> dict:
    """The authors' translate and cutout constants (pixels at M = 10) for images of side `size`: MPL's CIFAR rule
    (side // 8 for both) below 100 px, the ImageNet constants of both codes (100 and 40 px) from 100 px up."""
    return {"translate": size // 8, "cutout": size // 8} if size < 100 else {"translate": 100, "cutout": 40}


def authors_argument(name: str, magnitude: float, size: int):
    """The (unsigned) argument the authors' code gives operation `name` at level `magnitude` on images of side
    `size`; None for an operation without one."""
    spec = AUTHORS_OPS[name]
    if spec is None:
        return None
    top, _ = spec
    top = authors_constants(size)[top] if isinstance(top, str) else top
    level = magnitude / 10
    if name in ENHANCE:
        return level * top + 0.1
    if name in ("Posterize", "Solarize", "SolarizeAdd", "Cutout"):
        return int(level * top)
    return level * float(top)


def apply_authors_op(name: str, x: torch.Tensor, arg, generator: torch.Generator) -> torch.Tensor:
    """Operation `name` of the authors' list at argument `arg` (signed) on a uint8 batch, through torchvision's
    implementation of it (nearest-neighbour geometry, grey fill, as the authors' TensorFlow code)."""
    from torchvision.transforms.v2 import InterpolationMode, functional as F

    fill = [float(FILL)] * x.shape[1]
    nearest = InterpolationMode.NEAREST
    if name in ("AutoContrast", "Equalize", "Invert"):
        return getattr(F, name.lower())(x)
    if name == "Rotate":
        return F.rotate(x, arg, interpolation=nearest, fill=fill)
    if name == "Posterize":
        return F.posterize(x, min(arg, 8))  # M > 20 asks for more than 8 bits: the image as it is
    if name == "Solarize":
        return x if arg > 255 else F.solarize(x, arg)
    if name == "SolarizeAdd":
        return torch.where(x < 128, (x.int() + arg).clamp(0, 255).to(x.dtype), x)
    if name in ENHANCE:
        adjust = {"Color": F.adjust_saturation, "Contrast": F.adjust_contrast, "Brightness": F.adjust_brightness,
                  "Sharpness": F.adjust_sharpness}[name]
        return adjust(x, arg)
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(arg))
        return F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0] if name == "ShearX" else
                        [0.0, shear], interpolation=nearest, fill=fill, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        return F.affine(x, angle=0.0, translate=[arg, 0] if name == "TranslateX" else [0, arg], scale=1.0,
                        shear=[0.0, 0.0], interpolation=nearest, fill=fill)
    if name == "Cutout":
        return _cutout(x, arg, generator)
    raise KdrunError(f"unknown RandAugment operation '{name}'; use one of {', '.join(AUTHORS_OPS)}")


def _cutout(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image's rows and columns [c - pad, c + pad) around its own uniform centre c set to grey."""
    b, _, h, w = x.shape
    cy, cx = (torch.randint(n, (b, 1), generator=generator).to(x.device) for n in (h, w))
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (rows >= cy - pad) & (rows < cy + pad)
    cols = (cols >= cx - pad) & (cols < cx + pad)
    mask = (rows[:, :, None] & cols[:, None, :])[:, None].expand_as(x)
    return x.masked_fill(mask, FILL)


class RandAugment:
    """Cubuk et al. (CVPR-W 2020), RandAugment: `num_ops` operations per image, each drawn uniformly from a list,
    all at one magnitude. Two scales, and `magnitude` means something else on each:

    - `scale=torchvision`: torchvision's `transforms.v2.RandAugment` (identity, shear, translate, rotate,
      brightness, colour, contrast, sharpness, posterize, solarize, autocontrast, equalize), `magnitude` one of
      `num_bins` (31) bins, 0..30, spanning torchvision's ranges (rotate 30 degrees at 30, shear 0.3, ...).
    - `scale=noisy_student` or `mpl`: the authors' code (`AUTHORS_OPS`): M / 10 of each operation's maximum (rotate
      30 degrees at M = 10: Noisy Student's M = 27 rotates 81 degrees), their operation lists (with invert, cutout
      and solarize-add), grey fill; MPL's applies each drawn operation with a per-image probability in [0.2, 0.8].
      Not reproduced: MPL's extra cutout and flip-and-crop after RandAugment (data pipeline, not RandAugment),
      and the authors' contrast, whose grey reference is a histogram bug (torchvision's mean grey is used).

    Drawn per image, as the papers do: each image gets its own operations and signs. Images that drew
    the same operation and sign go through torchvision's implementation of it together, one call per
    group rather than per image (per-image calls cost ~1.5 ms/image on 2 CPU cores).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9, num_bins: int = 31, scale: str = "torchvision"):
        from torchvision.transforms import v2

        if scale not in SCALES:
            raise KdrunError(f"RandAugment scale '{scale}' is unknown; use torchvision (torchvision's 0..30 bins) or "
                             "noisy_student or mpl (the authors' code: M / 10 of each operation's maximum)")
        if scale == "torchvision" and not 0 <= magnitude < num_bins:
            raise KdrunError(f"RandAugment magnitude {magnitude} is outside 0..{num_bins - 1} on torchvision's scale; "
                             "give one in that range, or set scale to noisy_student or mpl for the authors' scale")
        if scale != "torchvision" and not 0 <= magnitude <= 30:
            raise KdrunError(f"RandAugment magnitude {magnitude} is outside 0..30 on the authors' scale (10 is each "
                             "operation's maximum, beyond it extrapolates); give one in that range")
        self.num_ops, self.scale, self.num_bins = int(num_ops), scale, int(num_bins)
        if scale == "torchvision":
            self.magnitude = int(magnitude)
            self._torchvision = v2.RandAugment(self.num_ops, self.magnitude, self.num_bins)
            self.ops = [(name, signed) for name, (_, signed) in self._torchvision._AUGMENTATION_SPACE.items()]
        else:
            self.magnitude = float(magnitude)
            self.ops = [(name, bool(AUTHORS_OPS[name] and AUTHORS_OPS[name][1])) for name in AUTHORS_LISTS[scale]]

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, scale={self.scale})"

    def _apply(self, name: str, x: torch.Tensor, sign: int, generator: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.scale != "torchvision":
            arg = authors_argument(name, self.magnitude, min(h, w))
            return apply_authors_op(name, x, None if arg is None else arg * sign, generator)
        tv = self._torchvision
        levels = tv._AUGMENTATION_SPACE[name][0](self.num_bins, h, w)
        m = 0.0 if levels is None else float(levels[self.magnitude]) * sign
        return tv._apply_image_or_video_transform(x, name, m, interpolation=tv.interpolation, fill=tv._fill)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uint8 batch (B, C, H, W) with every image independently augmented, every draw from `generator`."""
        b = x.shape[0]
        x = x.clone()
        signed = torch.tensor([s for _, s in self.ops])
        p = 0.2 + 0.6 * torch.rand(b, generator=generator) if self.scale == "mpl" else None
        for _ in range(self.num_ops):
            op = torch.randint(len(self.ops), (b,), generator=generator)
            negative = (torch.rand(b, generator=generator) < 0.5) & signed[op]
            group = op * 2 + negative
            if p is not None:  # MPL: the drawn operation happens with the image's probability
                group[torch.rand(b, generator=generator) > p] = -1
            for g in torch.unique(group).tolist():
                if g < 0:
                    continue
                idx = torch.nonzero(group == g).squeeze(1).to(x.device)
                x[idx] = self._apply(self.ops[g // 2][0], x[idx], -1 if g % 2 else 1, generator)
        return x


class _Chain:
    """Batched augmentations applied in order, each drawing from the loader's generator."""

    def __init__(self, *augments):
        self.augments = [a for a in augments if a]

    def __bool__(self) -> bool:
        return bool(self.augments)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for augment in self.augments:
            x = augment(x, generator)
        return x


# ---- the unlabeled stream ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    """A method's declaration of the unlabeled batches it needs.

    `ratio`: unlabeled images per labeled one in a step (FixMatch's and MPL's mu).
    `randaugment`: {num_ops, magnitude, scale} of the student's unlabeled view (after crop/flip), or None; `scale`
    (`RandAugment`): torchvision (the default: `magnitude` in torchvision's 0..30 bins) or the authors' code,
    noisy_student or mpl (`magnitude` M: M / 10 of each operation's maximum).
    `noise_labeled`: the same RandAugment on the labeled images (the noised student of Noisy Student).
    `weak_view`: also carry `unlabeled_weak_image`, the crop/flip-only view of the same images.
    """

    ratio: float
    randaugment: dict | None = None
    noise_labeled: bool = False
    weak_view: bool = False

    def __post_init__(self):
        if not self.ratio > 0:
            raise KdrunError(f"method.unlabeled_ratio={self.ratio}; give a positive number of unlabeled images "
                             "per labeled one")
        if self.randaugment is not None and not set(self.randaugment) <= {"num_ops", "magnitude", "num_bins", "scale"}:
            raise KdrunError(f"method.randaugment={dict(self.randaugment)}; give num_ops and magnitude (and "
                             "optionally scale: torchvision, noisy_student or mpl, and num_bins), or null for no "
                             "RandAugment")


class SemiLoader:
    """Labeled batches with unlabeled batches beside them. An epoch is one pass over the labeled images, as
    for every method, so a schedule means the same steps with or without unlabeled data; the unlabeled
    stream runs on across epochs, one shuffled pass over the unlabeled images after another."""

    def __init__(self, labeled: TensorLoader, unlabeled: InMemory, batch_size: int, normalize: Normalize,
                 augment: BatchAugment, randaugment: RandAugment | None, weak_view: bool, seed: int):
        self.labeled = labeled
        self.images = unlabeled.images.to(labeled.images.device)
        self.batch_size = min(batch_size, len(unlabeled))
        self.normalize = normalize
        self.augment = augment if augment else None
        self.randaugment = randaugment
        self.weak_view = weak_view
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 1)  # the unlabeled images' augmentations
        self.passes = self.position = 0  # where the unlabeled stream is: its pass, and the position in it
        self._order = (-1, None)

    def __len__(self) -> int:
        return len(self.labeled)

    def state_dict(self) -> dict:
        """Where both streams are and the random state they draw from, for resuming a run."""
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.generator.get_state(),
                "passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        self.generator.set_state(state["unlabeled"])
        self.passes, self.position = state["passes"], state["position"]

    def _pass_order(self) -> torch.Tensor:
        """The shuffled order of the current pass over the unlabeled images, drawn from (seed, pass)."""
        if self._order[0] != self.passes:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
            self._order = (self.passes, torch.randperm(len(self.images), generator=generator))
        return self._order[1]

    def _next_index(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            part = self._pass_order()[self.position:self.position + need]
            parts.append(part)
            need -= len(part)
            self.position += len(part)
            if self.position == len(self.images):
                self.passes, self.position = self.passes + 1, 0
        return torch.cat(parts).to(self.images.device)

    def __iter__(self):
        for labeled in self.labeled:
            batch = dict(labeled)
            index = self._next_index()
            x = self.images.index_select(0, index)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            if self.weak_view:
                batch["unlabeled_weak_image"] = self.normalize(x.clone())
            if self.randaugment is not None:
                x = self.randaugment(x, self.generator)
            batch["unlabeled_image"] = self.normalize(x)
            batch["unlabeled_index"] = index
            yield batch



def check(data, world_size: int = 1) -> None:
    """One sentence naming the fix when `data` (a `kdrun.data.Data`) cannot feed an unlabeled stream."""
    if world_size > 1:
        raise KdrunError("semi-supervised methods (an unlabeled stream) run on one device; set trainer.devices=1")
    if data.labeled_split is None:
        raise KdrunError("this method trains on unlabeled images too; split the training set with "
                         "dataset.labeled_per_class=N (or dataset.labeled_fraction=F)")
    if not isinstance(data.labeled_split.unlabeled, InMemory):
        raise KdrunError(f"{data.name} is read from files, and the unlabeled stream needs an in-memory dataset "
                         "(mnist, fashion_mnist, cifar10, cifar100, svhn, digits); choose one of those")


def loader(data, stream: Stream, batch_size: int, device, seed: int, world_size: int = 1,
           positions: torch.Tensor | None = None) -> SemiLoader:
    """The training loader of a method that declared `stream`, over `data` (a `kdrun.data.Data`) split;
    `positions`: the labeled images it draws (None: all)."""
    check(data, world_size)
    normalize = Normalize(data.mean, data.std, device)
    augment = BatchAugment(data.augment.get("crop_padding", 0), data.augment.get("flip", False))
    strong = RandAugment(**stream.randaugment) if stream.randaugment else None
    labeled_augment = _Chain(augment, strong) if stream.noise_labeled else augment
    labeled = TensorLoader(data.splits.train, batch_size, normalize, device, shuffle=True, drop_last=True,
                           augment=labeled_augment, seed=seed, positions=positions)
    return SemiLoader(labeled, data.labeled_split.unlabeled, round(stream.ratio * labeled.batch_size), normalize, augment,
                      strong, stream.weak_view, seed)
