"""Losses on logits.

Every function here is pure: tensors (and plain numbers) in, a scalar tensor out,
no state, no in-place change of its inputs. Teacher tensors are expected to be
detached by the caller; nothing here detaches anything.
"""

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): KL(p_t || p_s) between temperature-softened distributions, times T^2.

    The T^2 factor keeps the gradient magnitude of the soft term independent of T.
    Averaged over the batch.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def standardize(logits: torch.Tensor, eps: float = 1e-7, correction: int = 0) -> torch.Tensor:
    """Sun et al. CVPR 2024 (Logit Standardization in KD), the Z-score pre-process Z(z) = (z - mean(z)) / std(z).

    logits: (B, K). Mean and standard deviation are taken per sample over the K classes;
    the standard deviation is the population one (divide by K, as in the paper's
    definition of sigma(z)), and `eps` is added to it so a constant row gives zeros
    rather than NaN. `correction=1` divides by K - 1 instead, torch's default `std`, which
    the authors' released code uses. Returns a tensor of the same shape. The temperature
    is applied by the caller afterwards (softmax(standardize(z) / T)).
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, correction=correction)
    return (logits - mean) / (std + eps)


def _target_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    return F.one_hot(labels.long(), num_classes=logits.shape[1]).bool()


def _binary_log_probs(log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] per row, from log-softmax values; 1 - p_t computed as a sum, not a difference."""
    log_target = log_p[mask]
    log_rest = torch.logsumexp(log_p.masked_fill(mask, float("-inf")), dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def _non_target(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (B, K-1) logits of the non-target classes, in their original order."""
    return z[~mask].view(z.shape[0], z.shape[1] - 1)


def tckd_nckd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhao et al. CVPR 2022 (Decoupled KD), Sec. 3.1: the KD reformulation's TCKD and NCKD, each times T^2.

    student_logits, teacher_logits: (B, K); labels: (B,) integer class indices.
    TCKD = KL(b^T || b^S) with b = [p_target, 1 - p_target] of softmax(z / T).
    NCKD = KL(p_hat^T || p_hat^S) with p_hat = softmax over the K-1 non-target classes
    of z / T. The paper's pseudo-code masks the target with a large negative number
    before the softmax; here the target column is removed instead, which is the exact
    limit of that mask (no dependence on the size of the constant). Both terms are
    summed over classes and averaged over the batch, then multiplied by T^2.
    With these definitions KD = TCKD + (1 - p^T_target) * NCKD holds per sample (the
    paper's reformulation of KD, Sec. 3.1).
    """
    mask = _target_mask(student_logits, labels)
    zs = student_logits / temperature
    zt = teacher_logits / temperature
    log_b_s = _binary_log_probs(F.log_softmax(zs, dim=1), mask)
    log_b_t = _binary_log_probs(F.log_softmax(zt, dim=1), mask)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True)
    log_hat_s = F.log_softmax(_non_target(zs, mask), dim=1)
    log_hat_t = F.log_softmax(_non_target(zt, mask), dim=1)
    nckd = F.kl_div(log_hat_s, log_hat_t, reduction="batchmean", log_target=True)
    scale = temperature**2
    return tckd * scale, nckd * scale


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Zhao et al. CVPR 2022 (Decoupled KD), the DKD objective alpha * TCKD + beta * NCKD, each term times T^2.

    student_logits, teacher_logits: (B, K); labels: (B,) integer class indices.
    See `tckd_nckd` for the two terms; batch-mean reduction. The paper's warm-up of
    the DKD weight over the first epochs belongs to the caller.
    """
    tckd, nckd = tckd_nckd(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def _mean_pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """Mean over the other dimension of the Pearson correlation of a and b along `dim`."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    cov = (a * b).sum(dim=dim)
    norm = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    return (cov / norm.clamp_min(eps)).mean()


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    gamma: float,
    temperature: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Huang et al. NeurIPS 2022 (DIST), Sec. 3: beta * L_inter + gamma * L_intra (d_p = 1 - Pearson), each times T^2.

    student_logits, teacher_logits: (B, K). With Y = softmax(Z / T) (rows are samples):
    L_inter = 1 - mean over the B rows of the Pearson correlation between Y^s_i and Y^t_i
    (relation among classes within one sample); L_intra = 1 - mean over the K columns
    of the Pearson correlation between Y^s_:,j and Y^t_:,j (relation of one class
    across the batch). The product of the two standard deviations is clamped below at
    `eps` (a constant row or column then has correlation 0 instead of NaN).
    The cross-entropy term of the paper's total loss is the caller's.
    """
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1.0 - _mean_pearson(y_s, y_t, dim=1, eps=eps)
    intra = 1.0 - _mean_pearson(y_s, y_t, dim=0, eps=eps)
    scale = temperature**2
    return beta * inter * scale + gamma * intra * scale


def ensemble_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KD from an ensemble of M teachers: T^2 * KL(sum_m w_m softmax(z_m / T) || softmax(s / T)), batch mean.

    student_logits: (B, K); teacher_logits: (M, B, K); weights: (M,) non-negative, summing to 1
    (None: the plain average, as in Hinton et al. 2015's ensemble targets and You et al. KDD 2017).
    The mixture is formed in log space (logsumexp of log w_m + log softmax), so it stays finite.
    """
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"ensemble_kd_loss: teacher logits must be (M, B, K) with (B, K) = "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    m = teacher_logits.shape[0]
    if weights is None:
        weights = torch.full((m,), 1.0 / m, dtype=teacher_logits.dtype, device=teacher_logits.device)
    if weights.shape != (m,):
        raise ValueError(f"ensemble_kd_loss: weights must have shape ({m},), got {tuple(weights.shape)}")
    log_w = torch.log(weights.to(teacher_logits)).view(m, 1, 1)
    log_p_t = torch.logsumexp(log_w + F.log_softmax(teacher_logits / temperature, dim=2), dim=0)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
