"""Batches as dicts: `image` (normalised float), `label`, `index` (position in the split).

`TensorLoader` is the fast path for datasets held in memory: one `index_select` per batch
and augmentation done on the whole batch, on the training device. `FolderLoader` wraps a
torch DataLoader for datasets read from files.
"""

import math

import torch
from torch.utils.data import DataLoader, Dataset

from kdrun.data.sources import InMemory


class BatchAugment:
    """Random crop with zero padding and horizontal flip, drawn per image, applied to a uint8 batch."""

    def __init__(self, crop_padding: int = 0, flip: bool = False):
        self.crop_padding = crop_padding
        self.flip = flip

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.crop_padding
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = (torch.randint(0, 2 * p + 1, (2, b), generator=generator)).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(3), x)
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
    """Iterates over an in-memory split held on `device`, a batch at a time."""

    def __init__(self, data: InMemory, batch_size: int, normalize: Normalize, device, shuffle: bool = False,
                 drop_last: bool = False, augment: BatchAugment | None = None, seed: int = 0):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = min(batch_size, len(data)) if drop_last else batch_size
        self.normalize = normalize
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment else None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels) / self.batch_size
        return int(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images.index_select(0, index)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield {"image": self.normalize(x), "label": self.labels.index_select(0, index), "index": index}


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label, i


class FolderLoader:
    """A DataLoader over per-sample transforms; normalisation happens on the device, batched."""

    def __init__(self, dataset: Dataset, transform, batch_size: int, normalize: Normalize, device,
                 shuffle: bool = False, drop_last: bool = False, num_workers: int = 0, seed: int = 0):
        self.device = torch.device(device)
        self.normalize = normalize
        self.loader = DataLoader(
            _Indexed(dataset, transform), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for image, label, index in self.loader:
            image = image.to(self.device, non_blocking=True)
            yield {"image": self.normalize(image), "label": label.to(self.device), "index": index.to(self.device)}
