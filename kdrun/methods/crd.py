"""Tian, Krishnan & Isola ICLR 2020, "Contrastive Representation Distillation" (CRD).

The embeddings the classifiers receive are projected (a Linear to `feat_dim` and L2 normalisation, g_S and
g_T) and a critic h(T, S) = P / (P + N/M), P = exp(g_T(t) . g_S(s) / tau) / Z, tells the pair of one
image from N = `nce_k` negative pairs; loss = CE + beta * L_NCE (eq. 18, `kdrun.losses.crd_nce_loss`),
symmetric: the student embedding against the teacher's memory and the teacher embedding against the
student's. The negatives' embeddings come from two memory banks of one entry per training sample
(indexed by the batch's `index`), updated as m * old + (1 - m) * new and renormalised; they are drawn
uniformly among the samples of other classes (the benchmark's "exact" mode), and the normalising
constants Z are estimated once on the first batch (Z = M * mean P). Banks and constants are buffers, so
they are checkpointed. tau = 0.07, m = 0.5, N = 16384, beta = `weight` = 0.8.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import KdrunError
from kdrun.losses import crd_nce_loss
from kdrun.methods.feature import FeatureMethod


class _DenseScores(torch.autograd.Function):
    """gather(v @ memory^T, 1, idx), differentiated in v only: the gradient is the scores' gradient scattered into
    a dense (B, len(memory)) matrix times the bank, without autograd's generic gather-then-mm backward."""

    @staticmethod
    def forward(ctx, v, memory, idx):
        memory = memory.clone()  # the step updates the bank in place before the backward
        ctx.save_for_backward(memory, idx)
        return torch.gather(v @ memory.T, 1, idx)

    @staticmethod
    def backward(ctx, grad):
        memory, idx = ctx.saved_tensors
        dense = torch.zeros(grad.shape[0], memory.shape[0], dtype=grad.dtype, device=grad.device)
        return dense.scatter_add_(1, idx, grad) @ memory, None, None


class CRD(FeatureMethod):
    ranges = {"feat_dim": "[1, inf)", "nce_k": "[1, inf)", "nce_t": "(0, inf)", "nce_m": "[0, 1]"}
    positions = "embedding"

    def __init__(self, student, teacher, weight: float = 0.8, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.z_known = False

    def setup(self, data):
        labels = getattr(data.splits.train, "labels", None)
        if labels is None:
            labels = getattr(data.splits.train, "targets", None)
        if labels is None:
            raise KdrunError(f"crd draws negatives from other classes and needs the labels of {data.name}'s training "
                             "set up front; use an in-memory or torchvision ImageFolder dataset")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) < 2 or bool((labels == labels[0]).all()):
            raise KdrunError("crd needs a training set of at least two classes")
        super().setup(data)
        n, bound = len(labels), 1.0 / math.sqrt(self.feat_dim / 3)
        order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        counts = torch.bincount(labels)
        self.register_buffer("labels", labels)
        self.register_buffer("by_class", order)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts)
        self.register_buffer("class_size", counts)
        self.register_buffer("memory_s", torch.rand(n, self.feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(n, self.feat_dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student- and teacher-anchored critics; < 0: unset

    def build(self, s_feats, t_feats):
        self.embed_s = nn.Linear(s_feats[0].flatten(1).shape[1], self.feat_dim)
        self.embed_t = nn.Linear(t_feats[0].flatten(1).shape[1], self.feat_dim)

    def negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, nce_k) training-sample indices drawn uniformly, with replacement, among the other classes:
        a uniform rank among the samples outside the anchor's class, skipping that class's block."""
        y = self.labels[index].unsqueeze(1)
        start, size = self.class_start[y], self.class_size[y]
        others = len(self.labels) - size
        rank = torch.minimum((torch.rand(len(index), self.nce_k, device=index.device) * others).long(), others - 1)
        return self.by_class[rank + size * (rank >= start)]

    @staticmethod
    def scores(memory: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nce_k): <memory[idx[b, j]], v[b]>. With a bank not much larger than the samples drawn, one
        dense product with the whole bank, then a gather of the scores, is far faster than gathering the
        (B, 1 + nce_k, feat_dim) rows (the benchmark's bmm; measured 14x faster on Fashion-MNIST's 60,000 images)."""
        if len(memory) <= 8 * idx.shape[1]:
            return _DenseScores.apply(v, memory, idx)
        return torch.bmm(memory[idx], v.unsqueeze(2)).squeeze(2)

    def distill(self, s_feats, t_feats, batch):
        index = batch["index"]
        v_s = F.normalize(self.embed_s(s_feats[0].flatten(1)).float(), dim=1)
        v_t = F.normalize(self.embed_t(t_feats[0].flatten(1)).float(), dim=1)
        idx = torch.cat([index.unsqueeze(1), self.negatives(index)], dim=1)
        out_s = torch.exp(self.scores(self.memory_t, v_s, idx) / self.nce_t)
        out_t = torch.exp(self.scores(self.memory_s, v_t, idx) / self.nce_t)
        n = len(self.labels)
        if not self.z_known:  # checked once per process: a resumed run brings its Z in the state dict
            if self.z[0] < 0:
                self.z.copy_(torch.stack([out_s.mean(), out_t.mean()]).detach() * n)
            self.z_known = True
        out_s, out_t = out_s / self.z[0], out_t / self.z[1]
        loss = crd_nce_loss(out_s[:, 0], out_s[:, 1:], n) + crd_nce_loss(out_t[:, 0], out_t[:, 1:], n)
        with torch.no_grad():
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                memory.index_copy_(0, index, F.normalize(memory[index] * self.nce_m + v * (1 - self.nce_m), dim=1))
        return {"crd": self.weight * loss}
