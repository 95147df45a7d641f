"""Datasets by `_target_` (see `sources`), what a method's batches carry (`BatchSpec`), which data a
stage draws and reports on (`Selection`, `EvalSet`), and the loader factory the run hands the engine
(`Loaders`)."""

import copy
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from kdrun.data import semi
from kdrun.data.loaders import BatchAugment, FolderLoader, Normalize, StepClock, TensorLoader, Views
from kdrun.data.semi import LabeledSplit, Stream, labels_of
from kdrun.data.sources import InMemory, Splits
from kdrun.errors import KdrunError, instantiate

__all__ = ["BatchSpec", "Data", "EvalSet", "Loaders", "Selection", "build", "folder_transforms", "train_augment"]

TEACHER_VIEWS = ("same", "independent", "clean")


@dataclass
class Data:
    """A dataset ready for training: its train/test splits, its shape and how to normalise it."""

    name: str
    splits: Splits
    mean: list[float]
    std: list[float]
    augment: dict
    val: InMemory | Dataset | None = None  # images held out of the training set for model selection (dataset.val_size)
    val_index: torch.Tensor | None = None  # their positions in the source's training set
    labeled_split: LabeledSplit | None = None  # when dataset.labeled_* asks for one; `splits.train` is the labeled part

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def in_chans(self) -> int:
        return self.splits.in_chans

    @property
    def image_size(self) -> int:
        return self.splits.image_size

    def part(self, name: str):
        """A split by name: `train` (the labeled part, when there is a labeled split), `val`, `test`, `unlabeled`."""
        if name == "unlabeled":
            if self.labeled_split is None:
                raise KdrunError("this run asks for the unlabeled images, but the training set is not split; "
                                 "split it with dataset.labeled_per_class=N (or dataset.labeled_fraction=F)")
            return self.labeled_split.unlabeled
        if name == "val":
            if self.val is None:
                raise KdrunError("this run asks for validation images, but none are held out; "
                                 "set dataset.val_size=N (images) or a fraction such as 0.1")
            return self.val
        if name not in ("train", "test"):
            raise KdrunError(f"unknown data split '{name}'; use train, val, test or unlabeled")
        return getattr(self.splits, name)

    def evaluation_sets(self) -> tuple["EvalSet", ...]:
        """What a stage reports unless it names its own sets: `val` (when held out), then `test`."""
        return (VAL, TEST) if self.val is not None else (TEST,)

    def split_record(self) -> dict | None:
        """How the training set was split (validation, labeled/unlabeled), as plain data for split.json."""
        record = {}
        if self.val is not None:
            record.update(num_val=len(self.val_index), val_index=self.val_index.tolist())
        if self.labeled_split is not None:
            record.update(self.labeled_split.record())
        return record or None


@dataclass(frozen=True)
class BatchSpec:
    """What a method's training batches carry: its one declaration, read by `Loaders` (and `kdrun.cache`).

    `teacher_view`: what the teacher sees: the student's very image ("same"), an independently drawn view
    of the same image ("independent"), or the un-augmented image ("clean").
    `mixup_alpha`: mixup on the training views (not the clean one), coefficient ~ Beta(alpha, alpha).
    `cacheable`: the method reads nothing of the teacher but its logits, so `kdrun.cache` may stand in for it.
    `unlabeled`: unlabeled batches beside the labeled ones (`semi.Stream`: how many, how noised).
    `reads_training_images`: False for a method that trains on no training image (data-free distillation makes
    its own): its training loader is a `StepClock`, whose batches carry only `size` (the images a step should make)
    and as many of them an epoch as a pass over the training set would give; the evaluation sets are still read.
    """

    teacher_view: str = "same"
    mixup_alpha: float = 0.0
    cacheable: bool = False
    unlabeled: Stream | None = None
    reads_training_images: bool = True

    def __post_init__(self):
        if self.teacher_view not in TEACHER_VIEWS:
            raise KdrunError(f"unknown teacher view '{self.teacher_view}'; use one of {', '.join(TEACHER_VIEWS)}")
        if self.teacher_view == "clean" and self.mixup_alpha:
            raise KdrunError("mixup changes the student's image but a clean teacher view does not see it; "
                             "use mixup with the same or an independent teacher view")


@dataclass(frozen=True)
class Selection:
    """The training images a stage draws: those of `classes` and/or at `indices` (positions in the run's
    training set); None: all. Batches keep each image's position in the whole set as `index`."""

    classes: tuple[int, ...] | None = None
    indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation set, reported as `<name>/acc` and `<name>/loss`: the images of `split` (train, test,
    unlabeled) of `classes` (None: all); with `mask`, the logits are restricted to the classes it names (a
    continual scenario's protocols: the classes seen so far, or one experience's classes)."""

    name: str
    split: str = "test"
    classes: tuple[int, ...] | None = None
    mask: tuple[int, ...] | None = None


TEST = EvalSet("test")
VAL = EvalSet("val", "val")


def build(cfg: DictConfig) -> Data:
    """Load the dataset that `cfg` (the `dataset` group) describes."""
    splits = instantiate(cfg.source)
    mean = list(cfg.mean) if cfg.get("mean") else [0.5] * splits.in_chans
    std = list(cfg.std) if cfg.get("std") else [0.5] * splits.in_chans
    if len(mean) != splits.in_chans:  # a grey-scale dataset read as RGB, or the reverse
        mean, std = [sum(mean) / len(mean)] * splits.in_chans, [sum(std) / len(std)] * splits.in_chans
    if cfg.get("classes") is not None:
        splits = select_classes(splits, list(cfg.classes))
    return semi.split(hold_out(Data(cfg.name, splits, mean, std, dict(cfg.get("augment") or {})), cfg), cfg)


def class_positions(classes, num_classes: int, device=None) -> torch.Tensor:
    """(num_classes,) long: each class's position in `classes` (a sequence or tensor of class numbers), -1 for a
    class not among them; a relabelling table."""
    table = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    table[torch.as_tensor(classes, device=device)] = torch.arange(len(classes), device=device)
    return table


def select_classes(splits: Splits, classes: list[int]) -> Splits:
    """`splits` with only the images of `classes` (`dataset.classes`), relabelled 0..k-1 in the order given."""
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < splits.num_classes for c in classes):
        raise KdrunError(f"dataset.classes={classes}; give distinct class numbers between 0 and "
                         f"{splits.num_classes - 1}, e.g. [0, 2, 4, 6]")
    relabel = class_positions(classes, splits.num_classes)

    def keep(part):
        if isinstance(part, InMemory):
            mine = relabel[part.labels] >= 0
            return InMemory(part.images[mine], relabel[part.labels[mine]])
        if not hasattr(part, "samples"):
            raise KdrunError(f"dataset.classes needs an in-memory dataset or an image folder, not a "
                             f"{type(part).__name__}; leave dataset.classes unset")
        part = copy.copy(part)  # an ImageFolder: the samples of the classes, relabelled
        part.samples = [(path, int(relabel[y])) for path, y in part.samples if relabel[y] >= 0]
        part.imgs, part.targets = part.samples, [y for _, y in part.samples]
        part.classes = [part.classes[c] for c in classes]
        part.class_to_idx = {name: i for i, name in enumerate(part.classes)}
        return part

    return replace(splits, train=keep(splits.train), test=keep(splits.test), num_classes=len(classes))


def hold_out(data: Data, cfg: DictConfig) -> Data:
    """`data` less the validation images `cfg.val_size` asks for (a count, or a fraction of the training set),
    drawn per class with `cfg.split_seed`; they become `data.val`."""
    size = cfg.get("val_size")
    if size is None:
        return data
    train = data.splits.train
    n = len(train)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not (0 < size < 1 or 1 <= size < n and size == int(size)):
        raise KdrunError(f"dataset.val_size={size}; give a number of images (1 to {n - 1}) or a fraction between 0 and 1")
    fraction = size if size < 1 else size / n
    val, rest = semi.stratified(labels_of(train), fraction, int(cfg.get("split_seed") or 0),
                                f"dataset.val_size={size}", kept="for training")
    return replace(data, splits=replace(data.splits, train=semi.part(train, rest)), val=semi.part(train, val),
                   val_index=val)


def file_fingerprint(part) -> str | None:
    """sha256 of the files a split read from disk holds (their paths below its root, classes and sizes, in order;
    the whole source set of a subset), or None for a split held in memory."""
    while isinstance(part, torch.utils.data.Subset):
        part = part.dataset
    samples = getattr(part, "samples", None)
    if samples is None:
        return None
    root = Path(part.root)
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{Path(path).relative_to(root)}:{label}:{os.path.getsize(path)};".encode())
    return h.hexdigest()


def train_augment(data: Data) -> BatchAugment:
    """The batched training augmentation of an in-memory dataset."""
    return BatchAugment(data.augment.get("crop_padding", 0), data.augment.get("flip", False))


def positions(part, classes: tuple[int, ...] | None = None, indices: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The positions in `part` of the images of `classes` among `indices` (None where both are None)."""
    if classes is None and indices is None:
        return None
    index = torch.as_tensor(indices, dtype=torch.long) if indices is not None else torch.arange(len(part))
    if classes is not None:
        index = index[torch.isin(labels_of(part)[index], torch.as_tensor(classes))]
    if not len(index):
        raise KdrunError(f"the selection classes={classes} indices={'given' if indices else None} holds no image; "
                         "choose classes and indices that the dataset has")
    return index


class Loaders:
    """The loader factory a run hands the engine: a stage's training loader (for its `Selection`) and the
    loader of each named evaluation set, each built once and kept, so stages that draw the same data go on
    with one stream of batches and one random state (which `state_dict` gives, for resuming). With several
    ranks, this rank's share of each (the batch sizes are global)."""

    def __init__(self, data: Data, spec: BatchSpec, batch_size: int, eval_batch_size: int, device, seed: int,
                 num_workers: int = 0, cache=None, rank: int = 0, world_size: int = 1, curriculum=None):
        """`cache`: the teacher cache (`kdrun.cache.TeacherCache`) the method reads, or None. `curriculum`: the
        run's `kdrun.curriculum.Curriculum`, which its training loaders follow, or None."""
        if spec.unlabeled is not None:
            semi.check(data, world_size)  # before any work: the unlabeled stream needs a split, in memory
        if curriculum is not None:
            check_curriculum(data, spec)
        self.data, self.spec, self.device, self.seed = data, spec, device, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.views = Views(spec.teacher_view, spec.mixup_alpha, cached=cache is not None,
                           stored=cache.stored if cache is not None else None)
        self.shard = {"rank": rank, "world_size": world_size}
        self.normalize = Normalize(data.mean, data.std, device)
        self.curriculum = curriculum
        self._train, self._eval, self._states = {}, {}, {}

    @staticmethod
    def key(selection: Selection | None) -> str:
        """The name under which the training loader of `selection` keeps its random state."""
        if selection is None or selection == Selection():
            return "train"
        return "train-" + hashlib.sha256(json.dumps([selection.classes, selection.indices]).encode()).hexdigest()[:12]

    def train(self, selection: Selection | None = None):
        """The shuffled, augmented training loader of `selection`, carrying the method's declared views."""
        key = self.key(selection)
        if key not in self._train:
            loader = self._build_train(selection or Selection())
            if key in self._states:
                loader.load_state_dict(self._states.pop(key))
            self._train[key] = loader
        return self._train[key]

    def _build_train(self, selection: Selection):
        data, spec = self.data, self.spec
        train = data.splits.train
        where = positions(train, selection.classes, selection.indices)
        if not spec.reads_training_images:
            n = len(train) if where is None else len(where)
            return StepClock(n // self.batch_size, self.batch_size // self.shard["world_size"])
        if spec.unlabeled is not None:
            return semi.loader(data, spec.unlabeled, self.batch_size, self.device, self.seed, positions=where)
        if isinstance(train, InMemory):
            return TensorLoader(train, self.batch_size, self.normalize, self.device, shuffle=True, drop_last=True,
                                augment=train_augment(data), seed=self.seed, views=self.views, positions=where,
                                curriculum=self.curriculum, **self.shard)
        train_tf, test_tf = folder_transforms(data)
        teacher_tf = None if self.views.cached else {"independent": train_tf, "clean": test_tf}.get(self.views.teacher)
        return FolderLoader(train, train_tf, self.batch_size, self.normalize, self.device, shuffle=True, drop_last=True,
                            num_workers=self.num_workers, seed=self.seed, teacher_transform=teacher_tf,
                            mixup_alpha=self.views.mixup_alpha, positions=where, **self.shard)

    def evaluation(self, which: EvalSet = TEST):
        """The plain (un-augmented, in order) loader of an evaluation set."""
        key = (which.split, which.classes)
        if key not in self._eval:
            part = self.data.part(which.split)
            where = positions(part, which.classes)
            if isinstance(part, InMemory):
                loader = TensorLoader(part, self.eval_batch_size, self.normalize, self.device, positions=where,
                                      **self.shard)
            else:
                loader = FolderLoader(part, folder_transforms(self.data)[1], self.eval_batch_size, self.normalize,
                                      self.device, num_workers=self.num_workers, positions=where, **self.shard)
            self._eval[key] = loader
        return self._eval[key]

    def summary(self) -> dict:
        """What the run's summary.json records of its training data: `data/train_images_read` 0 when the method
        declared that it reads no training image (its loaders are `StepClock`s, which hold none)."""
        return {} if self.spec.reads_training_images else {"data/train_images_read": 0}

    def state_dict(self) -> dict:
        """The random state of every training loader built so far, by `key`."""
        return {key: loader.state_dict() for key, loader in self._train.items()}

    def load_state_dict(self, states: dict) -> None:
        """Restore the training loaders' random states; those not built yet take theirs when they are."""
        for key, state in states.items():
            if key in self._train:
                self._train[key].load_state_dict(state)
            else:
                self._states[key] = state


def check_curriculum(data: Data, spec: BatchSpec) -> None:
    """One sentence naming the fix when a curriculum cannot run on `data` with batches as `spec` declares."""
    what = ("reads no training image" if not spec.reads_training_images
            else "draws unlabeled batches too" if spec.unlabeled is not None else None)
    if what:
        raise KdrunError(f"a curriculum orders and transforms the training images, and this method {what}; "
                         "leave the curriculum out (curriculum=null)")
    if not isinstance(data.splits.train, InMemory):
        raise KdrunError(f"{data.name} is read from files, and a curriculum needs the in-memory loader (mnist, "
                         "fashion_mnist, cifar10, cifar100, svhn, digits); choose one of those or curriculum=null")


def folder_transforms(data: Data):
    from torchvision import transforms as T

    size = data.image_size
    mode = "L" if data.in_chans == 1 else "RGB"
    to_mode = T.Lambda(lambda im: im.convert(mode))
    train = [to_mode]
    if data.augment.get("random_resized_crop", False):
        train.append(T.RandomResizedCrop(size))
    else:
        train += [T.Resize(size), T.CenterCrop(size)]
    if data.augment.get("flip", False):
        train.append(T.RandomHorizontalFlip())
    resize = round(size * data.augment.get("test_resize_ratio", 1.0))
    test = [to_mode, T.Resize(resize), T.CenterCrop(size)]
    return T.Compose(train + [T.PILToTensor()]), T.Compose(test + [T.PILToTensor()])
