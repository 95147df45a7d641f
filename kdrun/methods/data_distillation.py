"""Radosavovic, Dollár, Girshick, Gkioxari & He (CVPR 2018), "Data Distillation: Towards Omni-Supervised
Learning".

Multi-transform inference: the trained teacher labels each unlabeled image by the ensemble (the mean of its
softmax) over several geometric transforms of it, here every `scales` zoom (about the centre) with and
without a horizontal `flip`; the ensemble's argmax is the image's label (`hard`, as in the paper). The student
then trains on labeled and automatically labeled images, both in every minibatch, with the loss of
`PseudoLabel`. The transforms must be ones the teacher was trained to be invariant to (the paper's detectors
were trained at several scales); a zoom it never saw makes the ensemble worse than the plain prediction.
"""

import torch
import torch.nn.functional as F

from kdrun.errors import KdrunError
from kdrun.methods.pseudo_label import PseudoLabel


def zoom(images: torch.Tensor, scale: float) -> torch.Tensor:
    """The images magnified by `scale` about their centre, at their own size (edges repeated when < 1)."""
    if scale == 1:
        return images
    theta = torch.tensor([[1 / scale, 0, 0], [0, 1 / scale, 0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class DataDistillation(PseudoLabel):
    def __init__(self, student, teacher, scales=(1.0,), flip: bool = True, hard: bool = True,
                 threshold: float = 0.0, unlabeled_weight: float = 1.0, unlabeled_ratio: float = 1.0,
                 randaugment: dict | None = None):
        super().__init__(student, teacher, hard, threshold, unlabeled_weight, unlabeled_ratio, randaugment)
        self.scales = [float(s) for s in scales]
        if not self.scales or min(self.scales) <= 0:
            raise KdrunError(f"method.scales={list(scales)}; give one or more positive zoom factors, e.g. [1.0, 1.2]")
        self.flip = flip

    def predict(self, model, images):
        probs = []
        for s in self.scales:
            x = zoom(images, s)
            probs.append(F.softmax(model(x).float(), dim=1))
            if self.flip:
                probs.append(F.softmax(model(x.flip(3)).float(), dim=1))
        return torch.stack(probs).mean(0)
