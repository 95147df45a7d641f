"""Datasets by `_target_` (see `sources`), and the loaders that turn them into batches."""

from dataclasses import dataclass

from omegaconf import DictConfig

from kdrun.data.loaders import BatchAugment, FolderLoader, Normalize, TensorLoader, Views
from kdrun.data.sources import InMemory, Splits
from kdrun.data.semi import Split, split
from kdrun.errors import instantiate

__all__ = ["Data", "Views", "build", "folder_transforms", "loaders", "train_augment"]


@dataclass
class Data:
    """A dataset ready for training: its splits, its shape and how to normalise it."""

    name: str
    splits: Splits
    mean: list[float]
    std: list[float]
    augment: dict
    split: Split | None = None  # the labeled/unlabeled split, when dataset.labeled_* asks for one

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def in_chans(self) -> int:
        return self.splits.in_chans

    @property
    def image_size(self) -> int:
        return self.splits.image_size


def build(cfg: DictConfig) -> Data:
    """Load the dataset that `cfg` (the `dataset` group) describes."""
    splits = instantiate(cfg.source)
    mean = list(cfg.mean) if cfg.get("mean") else [0.5] * splits.in_chans
    std = list(cfg.std) if cfg.get("std") else [0.5] * splits.in_chans
    if len(mean) != splits.in_chans:  # a grey-scale dataset read as RGB, or the reverse
        mean, std = [sum(mean) / len(mean)] * splits.in_chans, [sum(std) / len(std)] * splits.in_chans
    return split(Data(cfg.name, splits, mean, std, dict(cfg.get("augment") or {})), cfg)


def train_augment(data: Data) -> BatchAugment:
    """The batched training augmentation of an in-memory dataset."""
    return BatchAugment(data.augment.get("crop_padding", 0), data.augment.get("flip", False))


def loaders(data: Data, batch_size: int, eval_batch_size: int, device, seed: int, num_workers: int = 0,
            views: Views = Views(), rank: int = 0, world_size: int = 1):
    """The shuffled, augmented training loader (carrying the method's `views`) and the plain test loader;
    with several ranks, this rank's share of both (the batch sizes are global)."""
    normalize = Normalize(data.mean, data.std, device)
    train, test = data.splits.train, data.splits.test
    shard = {"rank": rank, "world_size": world_size}
    if isinstance(train, InMemory):
        return (
            TensorLoader(train, batch_size, normalize, device, shuffle=True, drop_last=True,
                         augment=train_augment(data), seed=seed, views=views, **shard),
            TensorLoader(test, eval_batch_size, normalize, device, **shard),
        )
    train_tf, test_tf = folder_transforms(data)
    teacher_tf = None if views.cached else {"independent": train_tf, "clean": test_tf}.get(views.teacher)
    return (
        FolderLoader(train, train_tf, batch_size, normalize, device, shuffle=True, drop_last=True,
                     num_workers=num_workers, seed=seed, teacher_transform=teacher_tf, mixup_alpha=views.mixup_alpha,
                     **shard),
        FolderLoader(test, test_tf, eval_batch_size, normalize, device, num_workers=num_workers, **shard),
    )


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
