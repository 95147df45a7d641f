"""Dhar, Singh, Peng, Wu & Chellappa (CVPR 2019), "Learning without Memorizing": LwF plus attention distillation.

For experience i > 0 the student trains on L_C + beta * L_D + gamma * L_AD, where L_C and L_D are LwF's L_new and
L_old (`kdrun.methods.lwf`, whose single-head reading applies: the old classes are those seen before this
experience) and L_AD (`kdrun.losses.continual.attention_distillation_loss`) is the L1 distance of the vectorised,
L2-normalised Grad-CAM maps of the previous and the new model at the last conv layer (`layer`; null: the student's
last `default_feature_layers` entry, e.g. cnn's `layer3`), both for the class b the previous model scores highest
among the old classes. The new model's map is computed from the training forward with the gradient's graph kept
(torch.autograd.grad with create_graph=True), so L_AD reaches the new model's weights through its activations and
through its Grad-CAM weights; FACIL's implementation computes both maps under no_grad, so its L_AD has no gradient
and its LwM trains as LwF. The previous model's map is detached (that model is frozen).

The paper gives no values for beta and gamma (FACIL reads it so too): both default to 1. It describes no warm-up,
so `warmup_epochs` defaults to 0 here (LwF's warm-up can be switched on). Reading the activations with forward hooks
(`kdrun.features`) needs a convolutional student: an MLP has no map to compare.
"""

import torch

from kdrun import features
from kdrun.errors import KdrunError
from kdrun.losses.continual import attention_distillation_loss, grad_cam
from kdrun.methods.lwf import LwF


class LwM(LwF):
    tabulates = False  # the previous model's Grad-CAM needs it to run on every batch
    ranges = {"gamma": "[0, inf)"}

    def __init__(self, student, teacher=None, temperature: float = 2.0, lambda_o: float = 1.0, gamma: float = 1.0,
                 warmup_epochs: int = 0, layer: str | None = None):
        super().__init__(student, teacher, temperature, lambda_o, warmup_epochs)
        self.gamma, self.layer = gamma, layer

    def setup(self, data):
        super().setup(data)
        layers = [self.layer] if self.layer else list(getattr(self.student, "default_feature_layers", None) or [])[-1:]
        field = "method.layer" if self.layer else "the student's last default feature layer"
        if not layers:
            raise KdrunError("method=lwm needs the student's last conv layer and the student names no default "
                             "feature layers; set method.layer to its module path (e.g. layer3)")
        x = features.probe_input(self.student, (data.in_chans, data.image_size, data.image_size))
        (feat,) = features.probe(self.student, layers, x, "student")
        if feat.dim() != 4:
            raise KdrunError(f"method=lwm compares Grad-CAM maps of a conv layer, but {field} '{layers[0]}' gives "
                             f"{tuple(feat.shape[1:])} features, not (C, H, W) maps; use a convolutional student, "
                             "e.g. student=cnn_small, or set method.layer to a conv layer's path")
        self.s_cam = features.FeatureHooks(self.student, layers, "student")
        self.p_cam = features.FeatureHooks(self.previous, layers, "student")

    def training_step(self, batch):
        if self.phase == "warmup" or not self.experience:
            return super().training_step(batch)
        x = batch["image"]
        logits, (activation,) = self.s_cam(x)
        previous, previous_map, top = self.previous_attention(x)
        losses, metrics = self.losses(logits, previous, batch["label"])
        new_map = grad_cam(activation, logits.gather(1, top[:, None]).squeeze(1), create_graph=True)
        losses["attention"] = self.gamma * attention_distillation_loss(previous_map, new_map)
        return losses, metrics

    def previous_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The previous model's logits, its Grad-CAM map for its top old class b, and b, per image (all detached)."""
        with torch.enable_grad():  # the frozen model's activations need a graph to their class score
            logits, (activation,) = self.p_cam(x.detach().requires_grad_(True))
            top = self.old[logits[:, self.old].argmax(1)]
            cam = grad_cam(activation, logits.gather(1, top[:, None]).squeeze(1), create_graph=False)
        return logits.detach(), cam.detach(), top
