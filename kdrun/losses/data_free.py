"""Losses of data-free distillation: DeepInversion's image priors and BatchNorm-statistics term, Adaptive
DeepInversion's competition term, DFAD's discrepancy and DAFL's class-balance term."""

import math

import torch
import torch.nn.functional as F


def bn_statistics_loss(features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """Yin et al. (CVPR 2020), Eq. 4 for one BatchNorm layer: ||mu(x) - running_mean||_2 + ||var(x) - running_var||_2,
    with mu and var the per-channel mean and variance of the layer's input `features` (N, C, ...) over every other
    dimension. The variance is the unbiased one, as BatchNorm stores it, so a batch with the stored statistics
    scores exactly 0."""
    x = features.transpose(0, 1).reshape(features.shape[1], -1).float()
    return torch.linalg.vector_norm(x.mean(1) - running_mean) + torch.linalg.vector_norm(x.var(1) - running_var)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's R_TV: per image, the l2 norms of the differences between neighbouring pixels in the four
    directions (across, down and both diagonals), summed; averaged over the batch."""
    diffs = (x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :],
             x[..., 1:, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, 1:])
    return sum(torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs).mean()


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's R_l2: the l2 norm of each image, averaged over the batch."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence between softmax(p / T) and softmax(q / T), in nats (0 to ln 2), averaged over the
    batch: Adaptive DeepInversion's teacher-student disagreement (its competition term maximises it, at T = 3)."""
    log_p = F.log_softmax(logits_p / temperature, dim=1)
    log_q = F.log_softmax(logits_q / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def logit_discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fang et al. (2019), DFAD: the mean absolute difference between the student's and the teacher's logits (the
    student minimises it, the generator maximises it)."""
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def class_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """H(p_bar), in nats: the entropy of the teacher's softmax averaged over the batch, ln C when the batch's
    predictions are spread evenly over the C classes, 0 when every image is one class. DAFL's information-entropy
    loss (Chen et al., ICCV 2019) is its negative, which a generator minimises to cover every class."""
    p_bar = F.softmax(teacher_logits.float(), dim=1).mean(0)
    return -(p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()
