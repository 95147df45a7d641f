"""What the data-free methods (`deepinversion`, `dfad`) share: they read no training image (their batches are a
step clock, `BatchSpec(reads_training_images=False)`), they learn the images' shape and normalisation from the
dataset, and they save grids of the images they make under the run dir's `samples/`."""

import torch
from torch import nn

from kdrun.data import BatchSpec
from kdrun.methods.base import Method


class DataFree(Method):
    needs_teacher = True
    batch_spec = BatchSpec(reads_training_images=False)

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__(student, teacher)
        self.shape = self.num_classes = self.mean = self.std = None

    def setup(self, data):
        self.shape = (data.in_chans, data.image_size, data.image_size)
        self.num_classes = data.num_classes
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std).view(1, -1, 1, 1)

    def pixel_range(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised values of pixel intensities 0 and 1, per channel (1, C, 1, 1)."""
        low = (0 - self.mean) / self.std
        high = (1 - self.mean) / self.std
        return low.to(device), high.to(device)

    def save_grid(self, loop, images: torch.Tensor, name: str, nrow: int | None = None) -> None:
        """`samples/<name>.png` in the run dir: `images` (normalised) as a grid, back in pixel intensities."""
        if loop.run_dir is None:
            return
        from torchvision.utils import save_image

        x = (images.detach().float().cpu() * self.std + self.mean).clamp(0, 1)
        path = loop.run_dir / "samples" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        save_image(x, tmp, nrow=nrow or self.num_classes, padding=1)
        tmp.replace(path)  # never a half-written image
