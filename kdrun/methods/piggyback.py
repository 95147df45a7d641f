"""Mallya, Davis & Lazebnik (ECCV 2018), "Piggyback: adapting a single network to multiple tasks by learning to
mask weights".

A frozen backbone; per experience t and per layer (every nn.Linear and nn.Conv2d weight but the classifier's), a
real-valued mask m (initialised to `mask_init` = 1e-2) thresholded to a binary one, 1[m > `threshold` = 5e-3], by
which the layer's weights are multiplied; the binarisation's gradient is the straight-through estimator (the
gradient with respect to the binary mask, passed to m unchanged); and a head per experience (a linear classifier on
the backbone's embedding, the input of its classifier). Biases and BatchNorm stay those of the backbone (BatchNorm
in eval mode, its statistics frozen). Each experience trains its masks and its head with cross-entropy over its
own classes' logits (the task's own classifier): task-incremental by design.

The backbone: Mallya et al. start from an ImageNet-trained network. A student that is not pretrained is trained
here on experience 0, with that experience's head, normally (its mask is all ones: the backbone as it is); then the
backbone is frozen and each later experience learns its masks and head only.

Evaluation (`eval_model`) runs the network of every experience (T forwards) and assembles one logit vector over all
classes: the logits of experience t's classes come from t's head on the backbone under t's masks. Under the
task-incremental protocol (logits masked to the experience's classes) this is exactly Piggyback's inference with
the task given. The class-incremental numbers compare logits across the experiences' networks, which is not
Piggyback's protocol (it needs the task label); they are reported as every method's are. The classes of
experiences not yet started are read from the backbone as it is (untrained masks are all ones) with the next
untrained experience's head.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdrun.features import INPUT_SUFFIX, classifier_input, probe_input, resolve
from kdrun.methods.base import Method, Stage, accuracy
from kdrun.methods.ewc import experience_of


class Binarize(torch.autograd.Function):
    """1[m > threshold] forward; the gradient passed through unchanged backward (straight-through)."""

    @staticmethod
    def forward(ctx, mask, threshold):
        return (mask > threshold).to(mask.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TaskNetworks(nn.Module):
    """The backbone (the student), one set of masks and one head per experience, and which experience owns each
    class (`owner`, -1 for none yet); its forward assembles every experience's logits for its classes."""

    def __init__(self, student: nn.Module, classifier: str, mask_names: list[str], num_classes: int,
                 threshold: float):
        super().__init__()
        self.student, self.classifier, self.mask_names, self.threshold = student, classifier, mask_names, threshold
        self.masks = nn.ModuleList()  # experience t >= 1: a ParameterDict of real-valued masks (experience 0: none)
        self.heads = nn.ModuleList()  # experience t >= 1; experience 0's head is the student's classifier
        self.register_buffer("owner", torch.full((num_classes,), -1, dtype=torch.long))
        self._feature = None
        resolve(student, classifier).register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module, args):
        self._feature = args[0]

    def head(self, t: int) -> nn.Module:
        return resolve(self.student, self.classifier) if t == 0 else self.heads[t - 1]

    def forward_experience(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Experience t's network: its head on the backbone under its binary masks (t = 0: the student as is)."""
        if t == 0:
            return self.student(x)
        params = dict(self.student.named_parameters())
        masked = {n: params[n] * Binarize.apply(m, self.threshold) for n, m in zip(self.mask_names, self.masks[t - 1].values())}
        functional_call(self.student, masked, (x,))
        feature, self._feature = self._feature, None
        return self.heads[t - 1](feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner.tolist()
        started = max(owner) + 1
        unseen = min(started, len(self.heads))  # the next untrained experience (the last one once all have started)
        logits = None
        for t in sorted(set(owner)):
            out = self.forward_experience(x, unseen if t == -1 else t)
            if logits is None:
                logits = torch.empty_like(out)
            cols = [c for c, o in enumerate(owner) if o == t]
            logits[:, cols] = out[:, cols]
        return logits


class Piggyback(Method):
    ranges = {"threshold": "[0, inf)", "mask_init": "[0, inf)"}

    def __init__(self, student, teacher=None, threshold: float = 5e-3, mask_init: float = 1e-2):
        super().__init__(student)
        self.threshold, self.mask_init = threshold, mask_init

    def setup(self, data):
        x = probe_input(self.student, (data.in_chans, data.image_size, data.image_size))
        classifier = classifier_input(self.student, x, "student")[: -len(INPUT_SUFFIX)]
        masked = [f"{path}.weight" for path, m in self.student.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and path != classifier]
        # the student is a submodule twice (its weights appear under student.* and networks.student.*)
        self.networks = TaskNetworks(self.student, classifier, masked, data.num_classes, self.threshold)

    def experience_stages(self, epochs, experience):
        """Experience 0: the student (backbone and head 0). Experience t > 0: its masks and head, made here (once)
        so that its optimizer and a resumed run's checkpoint find them."""
        net = self.networks
        if experience == 0:
            return [Stage("train", epochs, params=list(self.student.parameters()))]
        while len(net.heads) < experience:
            params = dict(self.student.named_parameters())
            net.masks.append(nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.full_like(params[n], self.mask_init))
                                               for n in net.mask_names}))
            head = net.head(0)
            new = nn.Linear(head.in_features, head.out_features, head.bias is not None).to(head.weight.device)
            net.heads.append(new)
        return [Stage("train", epochs, params=[*net.masks[experience - 1].parameters(),
                                               *net.heads[experience - 1].parameters()])]

    def on_stage_start(self, stage, loop):
        t = experience_of(stage, "piggyback")
        self.experience = t
        self.classes = torch.tensor(stage.info["classes"], device=self.networks.owner.device)
        self.networks.owner[self.classes] = t
        self.student.requires_grad_(t == 0)  # frozen after experience 0
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "experience", 0) > 0:
            self.student.eval()  # the frozen backbone's BatchNorm statistics and dropout
        return self

    def training_step(self, batch):
        logits = self.networks.forward_experience(batch["image"], self.experience)[:, self.classes]
        target = (batch["label"][:, None] == self.classes).float().argmax(1)  # the label's place among the classes
        return {"ce": F.cross_entropy(logits, target)}, {"acc": accuracy(logits, target)}

    def eval_model(self):
        return self.networks
