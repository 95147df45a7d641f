"""Where images come from: each function returns the train and test splits of one dataset.

Datasets that fit in memory (MNIST, Fashion-MNIST, CIFAR, SVHN, digits) come back as uint8
tensors, which the tensor-resident loader slices and augments a whole batch at a time.
Folder datasets come back as torchvision datasets, read per sample by a DataLoader.
"""

import gzip
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdrun.errors import KdrunError

log = logging.getLogger(__name__)

# Where Debian's `dataset-fashion-mnist` package installs the gz IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class InMemory:
    """A split held as tensors: images (N, C, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    train: InMemory | Dataset
    test: InMemory | Dataset
    num_classes: int
    in_chans: int
    image_size: int


def _in_memory(images: np.ndarray | torch.Tensor, labels, channels_last_input: bool = False) -> InMemory:
    images = torch.as_tensor(np.asarray(images), dtype=torch.uint8)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif channels_last_input:
        images = images.permute(0, 3, 1, 2)
    return InMemory(images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _splits(train: InMemory, test: InMemory, num_classes: int) -> Splits:
    return Splits(train, test, num_classes, in_chans=train.images.shape[1], image_size=train.images.shape[-1])


_IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _torchvision(cls_name: str, root: str, download: bool, hint: str, **split_kwargs):
    """Open a torchvision dataset, downloading it if allowed; a missing dataset is one clear error."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(root, download=download, **split_kwargs)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... for missing data
        how = "the download failed" if download else "dataset.download=false"
        raise KdrunError(f"{cls_name} is not in {root} and {how} ({type(e).__name__}: {e}); {hint}") from e


def _mnist_like(cls_name: str, root: str, download: bool, num_classes: int, debian: Path | None = None) -> Splits:
    raw = Path(root).expanduser() / cls_name / "raw"
    if debian is not None and not all((raw / f).exists() for f in _IDX_FILES):
        if all((debian / f"{f}.gz").exists() for f in _IDX_FILES):
            raw.mkdir(parents=True, exist_ok=True)
            for f in _IDX_FILES:  # decompress once; the rename makes a half-written file impossible
                with gzip.open(debian / f"{f}.gz", "rb") as src, open(raw / f"{f}.part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                (raw / f"{f}.part").replace(raw / f)
    hint = f"put the four IDX files ({', '.join(_IDX_FILES)}) in {raw}, or set dataset.download=true with internet access"
    if debian is not None:
        hint = f"install Debian's package (apt-get install dataset-fashion-mnist), or {hint}"
    root = str(Path(root).expanduser())
    train = _torchvision(cls_name, root, download, hint, train=True)
    test = _torchvision(cls_name, root, download, hint, train=False)
    return _splits(_in_memory(train.data, train.targets), _in_memory(test.data, test.targets), num_classes)


def fashion_mnist(root: str, download: bool = True) -> Splits:
    return _mnist_like("FashionMNIST", root, download, 10, debian=DEBIAN_FASHION_MNIST)


def mnist(root: str, download: bool = True) -> Splits:
    return _mnist_like("MNIST", root, download, 10)


def cifar10(root: str, download: bool = True) -> Splits:
    return _cifar("CIFAR10", root, download, 10)


def cifar100(root: str, download: bool = True) -> Splits:
    return _cifar("CIFAR100", root, download, 100)


def _cifar(cls_name: str, root: str, download: bool, num_classes: int) -> Splits:
    root = str(Path(root).expanduser())
    hint = f"put the python-version archive's extracted folder in {root}, or set dataset.download=true with internet access"
    train = _torchvision(cls_name, root, download, hint, train=True)
    test = _torchvision(cls_name, root, download, hint, train=False)
    return _splits(
        _in_memory(train.data, train.targets, channels_last_input=True),
        _in_memory(test.data, test.targets, channels_last_input=True),
        num_classes,
    )


def svhn(root: str, download: bool = True) -> Splits:
    root = str(Path(root).expanduser())
    hint = f"put train_32x32.mat and test_32x32.mat in {root}, or set dataset.download=true with internet access"
    train = _torchvision("SVHN", root, download, hint, split="train")
    test = _torchvision("SVHN", root, download, hint, split="test")
    return _splits(_in_memory(train.data, train.labels), _in_memory(test.data, test.labels), 10)


def digits(test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download); a fixed, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, data.target, test_size=test_fraction, random_state=0, stratify=data.target
    )
    return _splits(_in_memory(x_tr, y_tr), _in_memory(x_te, y_te), 10)


def read_image(path: str):
    """torchvision's default image loader (the image in RGB), with an unreadable file one sentence naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        why = str(e).replace(f" {path!r}", "")
        raise KdrunError(f"cannot read the image {path} ({why}); replace or remove it, or set "
                         "dataset.skip_bad_images=true to leave unreadable images out") from None


def _skip_unreadable(folder) -> int:
    """Drop the images of a torchvision ImageFolder that cannot be decoded; returns how many."""
    bad = set()
    for path, _ in folder.samples:
        try:
            read_image(path)
        except KdrunError:
            bad.add(path)
    folder.samples = folder.imgs = [s for s in folder.samples if s[0] not in bad]
    folder.targets = [label for _, label in folder.samples]
    return len(bad)


def image_folder(root: str, image_size: int | None = None, in_chans: int | None = None,
                 train_dir: str = "train", test_dir: str = "val", skip_bad_images: bool = False) -> Splits:
    """Any `root/train/<class>/*.png|jpg` + `root/val/<class>/...` tree, read per sample.

    Image size and channels are read from the first training image unless given. An image that cannot be read
    stops the run with its name, unless `skip_bad_images`: then every image is decoded once here, and those that
    fail are left out and counted.
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root_path = Path(root).expanduser()
    for split in (train_dir, test_dir):
        if not (root_path / split).is_dir():
            raise KdrunError(
                f"image folder {root_path / split} does not exist; set dataset.root to a folder holding "
                f"{train_dir}/<class>/*.jpg and {test_dir}/<class>/*.jpg"
            )
    train = ImageFolder(str(root_path / train_dir), loader=read_image)
    test = ImageFolder(str(root_path / test_dir), loader=read_image)
    if train.classes != test.classes:
        raise KdrunError(f"{root_path}: the class folders of {train_dir}/ and {test_dir}/ differ; give both the same classes")
    if skip_bad_images:
        skipped = {split: _skip_unreadable(folder) for split, folder in ((train_dir, train), (test_dir, test))}
        if any(skipped.values()):
            log.warning("image folder %s: left out %d unreadable images of %s/ and %d of %s/ (dataset.skip_bad_images)",
                        root_path, skipped[train_dir], train_dir, skipped[test_dir], test_dir)
        if not train.samples or not test.samples:
            raise KdrunError(f"image folder {root_path}: no readable image is left in {train_dir}/ or {test_dir}/")
    read_image(train.samples[0][0])  # an unreadable first image is named here
    with Image.open(train.samples[0][0]) as first:
        image_size = image_size or min(first.size)
        in_chans = in_chans or (1 if first.mode in ("L", "I", "I;16", "1") else 3)
    return Splits(train, test, len(train.classes), in_chans, image_size)
