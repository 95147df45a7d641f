import pytest
import torch
from PIL import Image

from conftest import make_cfg, needs_fashion_mnist
from kdrun import data as kdata
from kdrun.data.loaders import BatchAugment, Normalize, TensorLoader
from kdrun.data.sources import InMemory, digits, image_folder, mnist
from kdrun.errors import KdrunError


def test_crop_is_a_window_of_the_zero_padded_image():
    x = torch.arange(1, 2 * 3 * 5 * 5 + 1, dtype=torch.uint8).view(2, 3, 5, 5)
    out = BatchAugment(crop_padding=2)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_crop_and_flip_vary_per_image_and_follow_the_generator():
    x = torch.randint(0, 255, (64, 1, 8, 8), dtype=torch.uint8)
    aug = BatchAugment(crop_padding=2, flip=True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    changed = [(a[i] != x[i]).any().item() for i in range(64)]
    assert 0 < sum(changed) < 64  # some images kept (offset 2,2 and no flip), most moved


def test_flip_only_mirrors():
    x = torch.randint(0, 255, (32, 1, 4, 4), dtype=torch.uint8)
    out = BatchAugment(flip=True)(x, torch.Generator().manual_seed(0))
    for i in range(32):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))


def test_tensor_loader_visits_every_image_once_and_normalises():
    data = InMemory(torch.full((10, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(10))
    loader = TensorLoader(data, 4, Normalize([0.5], [0.25], "cpu"), "cpu", shuffle=True, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(10))
    assert all(torch.equal(b["label"], b["index"]) for b in batches)
    assert torch.allclose(batches[0]["image"], torch.tensor(2.0))  # (1 - 0.5) / 0.25
    dropped = TensorLoader(data, 4, Normalize([0.5], [0.25], "cpu"), "cpu", shuffle=True, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 2


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = digits(), digits()
    assert torch.equal(a.train.labels, b.train.labels)
    assert (len(a.train), len(a.test), a.num_classes, a.in_chans, a.image_size) == (1437, 360, 10, 1, 8)
    assert torch.bincount(a.test.labels).min() >= 35
    assert a.train.images.dtype == torch.uint8 and a.train.images.max() == 255


def test_missing_dataset_offline_names_the_fix(tmp_path):
    with pytest.raises(KdrunError, match=r"MNIST is not in .*put the four IDX files"):
        mnist(str(tmp_path), download=False)


@needs_fashion_mnist
def test_fashion_mnist_comes_from_the_debian_package(tmp_path):
    cfg = make_cfg(f"dataset.root={tmp_path}", "dataset.download=false", "dataset.val_size=null")
    data = kdata.build(cfg.dataset)
    assert (len(data.splits.train), len(data.splits.test), data.num_classes) == (60000, 10000, 10)
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # decompressed once
    assert torch.bincount(data.splits.test.labels).tolist() == [1000] * 10


def test_image_folder_reads_size_channels_and_classes(tmp_path):
    d = digits()
    for split, part in (("train", d.train), ("val", d.test)):
        for i in [int(torch.nonzero(part.labels == c)[k]) for c in range(10) for k in range(2)]:
            folder = tmp_path / split / f"class_{part.labels[i].item()}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.images[i, 0].numpy(), mode="L").save(folder / f"{i}.png")
    cfg = make_cfg("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.augment.flip=false")
    data = kdata.build(cfg.dataset)
    assert (data.in_chans, data.image_size) == (1, 8)
    loaders = kdata.Loaders(data, kdata.BatchSpec(), 4, 8, "cpu", seed=0)
    train, test = loaders.train(), loaders.evaluation()
    batch = next(iter(train))
    assert batch["image"].shape == (4, 1, 8, 8) and batch["image"].dtype == torch.float32
    first = next(iter(test))
    i = first["index"][0].item()
    raw = torch.as_tensor(list(Image.open(test.loader.dataset.dataset.samples[i][0]).getdata()), dtype=torch.float32)
    assert torch.allclose(first["image"][0].flatten(), (raw / 255 - 0.5) / 0.5)


def test_missing_image_folder_names_the_fix(tmp_path):
    with pytest.raises(KdrunError, match="set dataset.root"):
        image_folder(str(tmp_path))
