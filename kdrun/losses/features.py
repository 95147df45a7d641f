"""Losses on intermediate features and on relations between samples.

Every function here is pure: tensors (and plain numbers) in, a scalar tensor out
(or, for `attention_map`, `fsp_matrix` and `ofd_margin`, a small helper tensor),
no state, no in-place change of its inputs. Feature tensors have shape
(B, C, H, W) or (B, D). Teacher tensors are expected to be detached by the caller;
nothing here detaches anything. Any regressor / connector that the paper puts
on the student side (FitNets' regressor, AB's connector, VID's mean network, ...)
is applied by the caller, and its output is what these functions receive.
Shape mismatches that the caller must resolve (by a connector or by interpolation)
raise ValueError.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} differs from teacher shape "
            f"{tuple(teacher.shape)}; map the student with a connector first"
        )


def _same_batch(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: batch sizes differ ({student.shape[0]} vs {teacher.shape[0]})")


def _min_batch(x: torch.Tensor, n: int, what: str) -> None:
    if x.shape[0] < n:
        raise ValueError(f"{what}: needs a batch of at least {n} samples, got {x.shape[0]}")


def _spatial(feat: torch.Tensor, what: str) -> torch.Size:
    if feat.dim() < 3:
        raise ValueError(f"{what}: expected a (B, C, H, W) feature map, got shape {tuple(feat.shape)}")
    return feat.shape[2:]


def _same_spatial(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    _same_batch(student, teacher, what)
    if _spatial(student, what) != _spatial(teacher, what):
        raise ValueError(
            f"{what}: spatial sizes differ ({tuple(student.shape[2:])} vs {tuple(teacher.shape[2:])}); "
            "interpolate one of them to the other's size first"
        )


REDUCTIONS = ("batchmean", "mean")


def _check_reduction(reduction: str, what: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------- FitNets


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Romero et al. ICLR 2015 (FitNets), the hint loss L_HT of eq. (3), as a mean squared error.

    student_feat: the regressor output r(v_guided), same shape as teacher_feat,
    (B, C, H, W) or (B, D). The paper writes L_HT = 1/2 * ||u_hint - r(v_guided)||^2
    (sum of squares per sample, times 1/2). This function returns the MSE instead,
    the mean of the squared differences over ALL elements (batch included), which is
    what the benchmark tables (e.g. CRD's FitNet rows) use. Conversion:
        batch mean of the paper's 0.5 * ||.||^2 = 0.5 * (numel / B) * hint_loss.
    """
    _same_shape(student_feat, teacher_feat, "hint_loss")
    return (student_feat - teacher_feat).pow(2).mean()


# --------------------------------------------------------------------------- AT


def attention_map(feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Zagoruyko & Komodakis ICLR 2017 (AT), F^p_sum(A) = sum_c |A_c|^p, vectorised and L2-normalised.

    feat: (B, C, H, W). Returns Q / ||Q||_2 of shape (B, H*W), one unit-norm row per sample.
    """
    _spatial(feat, "attention_map")
    q = feat.abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def at_loss(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2, squared: bool = False
) -> torch.Tensor:
    """Zagoruyko & Komodakis ICLR 2017 (AT), eq. (2): || Q_S/||Q_S||_2 - Q_T/||Q_T||_2 ||_2 per sample, batch mean.

    student_feat: (B, C_s, H, W), teacher_feat: (B, C_t, H, W); channel counts may
    differ, spatial sizes must be equal (the caller interpolates; otherwise ValueError).
    `p` is the exponent of the attention map F^p_sum. This is the paper's form: the
    plain (not squared) norm of the difference of the normalised maps. Eq. (2) writes
    that norm as ||.||_p and the experiments use p = 2 for both the map exponent and
    the norm; here the norm is always the 2-norm and `p` only sets the map exponent.
    The benchmark code instead uses the mean over positions of the SQUARED difference,
    i.e. ||.||_2^2 / (H*W); the two differ in value and in gradient. `squared=True` returns
    that form, the one the authors' code and the CRD benchmark weight (beta = 1000) use.
    The paper's factor beta/2 and the sum over layer pairs are the caller's.
    """
    _same_spatial(student_feat, teacher_feat, "at_loss")
    diff = attention_map(student_feat, p) - attention_map(teacher_feat, p)
    if squared:
        return diff.pow(2).mean()
    return torch.linalg.vector_norm(diff, ord=2, dim=1).mean()


# --------------------------------------------------------------------------- SP


def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Tung & Mori ICCV 2019 (similarity-preserving KD), eq. (2)-(4): ||G_S - G_T||_F^2 / b^2.

    student_feat: (b, ...), teacher_feat: (b, ...); each is flattened to Q of shape
    (b, chw), G~ = Q Q^T (b, b), and every row of G~ is divided by its L2 norm.
    The loss is one layer pair's term of eq. (4); the sum over pairs is the caller's.
    """
    _same_batch(student_feat, teacher_feat, "sp_loss")
    b = student_feat.shape[0]

    def gram(feat: torch.Tensor) -> torch.Tensor:
        q = feat.flatten(1)
        return F.normalize(q @ q.t(), p=2, dim=1)

    return (gram(student_feat) - gram(teacher_feat)).pow(2).sum() / (b * b)


# --------------------------------------------------------------------------- RKD


def rkd_distance_loss(s: torch.Tensor, t: torch.Tensor, include_diagonal: bool = False) -> torch.Tensor:
    """Park et al. CVPR 2019 (RKD), eq. (2)-(3): Huber loss between mean-normalised pairwise distances.

    s: (B, D_s), t: (B, D_t) embeddings (more dimensions are flattened), B >= 2.
    psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu, mu = mean distance over the distinct pairs
    of the batch. Huber (smooth L1, delta = 1) between student and teacher psi_D.
    The paper writes a SUM over the pairs; this returns the MEAN over the B(B-1)/2
    distinct pairs (equivalently over the ordered pairs i != j), so the value does
    not grow with B. `include_diagonal=True` averages over all B^2 entries of the
    distance matrix, its zero diagonal included, as the CRD benchmark's RKDLoss does
    ((B-1)/B times the default).
    """
    _same_batch(s, t, "rkd_distance_loss")
    _min_batch(s, 2, "rkd_distance_loss")
    b = s.shape[0]

    def psi(x: torch.Tensor) -> torch.Tensor:
        d = F.pdist(x.flatten(1))  # the pairs i < j
        return d / d.mean()

    if include_diagonal:  # each pair twice (i, j and j, i), the B zero diagonal terms add nothing
        return 2.0 * F.smooth_l1_loss(psi(s), psi(t), reduction="sum", beta=1.0) / (b * b)
    return F.smooth_l1_loss(psi(s), psi(t), reduction="mean", beta=1.0)


def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor, include_diagonal: bool = False) -> torch.Tensor:
    """Park et al. CVPR 2019 (RKD), eq. (4)-(5): Huber loss between cosines of the angles of triplets.

    s: (B, D_s), t: (B, D_t) embeddings (more dimensions are flattened), B >= 3.
    psi_A(x_i, x_j, x_k) = cos of the angle at x_j = <e_ij, e_kj>, e_ij = (x_i - x_j) / ||x_i - x_j||.
    Huber (smooth L1, delta = 1) between student and teacher psi_A, averaged over all
    ordered triplets of distinct indices (the paper writes a sum over them; see
    `rkd_distance_loss`). With the Gram matrix G of the centred embeddings,
    <x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj, so nothing larger than B^3 scalars
    is formed (in float64, against the cancellation); e_ij = 0, with no gradient, where x_i = x_j.
    `include_diagonal=True` averages over all B^3 entries (j, i, k) instead, the degenerate ones (i = j,
    k = j: 0 on both sides; i = k: 1 on both sides) included, as the CRD benchmark's RKDLoss does
    ((B-1)(B-2)/B^2 times the default).
    """
    _same_batch(s, t, "rkd_angle_loss")
    _min_batch(s, 3, "rkd_angle_loss")
    b = s.shape[0]
    pairs = torch.triu_indices(b, b, offset=1, device=s.device)  # i < j, as F.pdist lists them

    def psi(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).double()
        x = x - x.mean(dim=0)
        g = x @ x.t()
        d = F.pdist(x)
        r = torch.where(d > 0, 1.0 / d.clamp_min(1e-12), torch.zeros_like(d))
        r = torch.zeros_like(g).index_put(tuple(pairs), r)
        r = r + r.t()  # 1 / ||x_i - x_j||, 0 on i = j
        h = g - g.diagonal().unsqueeze(1) / 2  # h[j, i] = G_ji - G_jj / 2
        n = g.unsqueeze(0) - h.unsqueeze(2) - h.unsqueeze(1)  # n[j, i, k], j the vertex
        return n * r.unsqueeze(2) * r.unsqueeze(1)  # 0 where i = j or k = j

    huber = F.smooth_l1_loss(psi(s), psi(t), reduction="none", beta=1.0)
    if include_diagonal:  # i = k: <e_ij, e_ij> = 1 on both sides, or 0 where x_i = x_j (as the benchmark has it)
        return (huber.sum() / b**3).to(s.dtype)
    distinct = ~torch.eye(b, dtype=torch.bool, device=s.device)  # i != k
    return (torch.where(distinct, huber, torch.zeros_like(huber)).sum() / (b * (b - 1) * (b - 2))).to(s.dtype)


# --------------------------------------------------------------------------- PKT


def pkt_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7, reduction: str = "batchmean",
             include_diagonal: bool = False) -> torch.Tensor:
    """Passalis & Tefas ECCV 2018 (PKT), cosine-kernel conditional probabilities and KL(teacher || student).

    s: (B, D_s), t: (B, D_t) (more dimensions are flattened), B >= 2.
    K(a, b) = (cos(a, b) + 1) / 2 in [0, 1]; p_{j|i} = K(x_j, x_i) / sum_{k != i} K(x_k, x_i),
    j != i (self-pairs excluded, as in the paper's definition). The paper's loss is
    sum_i sum_{j != i} p^t_{j|i} log(p^t_{j|i} / p^s_{j|i}); this returns that divided by
    B (a batch mean of per-sample KL divergences). `eps` guards the vector norms and
    the logarithms. `reduction="mean"` divides by B^2 instead of B. `include_diagonal=True`
    keeps the self-pairs j = i (K = 1) in the kernel, its row sums and the divergence, as the
    official code and the CRD benchmark's PKT do; with `reduction="mean"` that is the
    benchmark's loss, the mean over all B^2 entries (for which its weight 30000 was chosen).
    """
    _same_batch(s, t, "pkt_loss")
    _check_reduction(reduction, "pkt_loss")
    _min_batch(s, 2, "pkt_loss")
    b = s.shape[0]
    keep = torch.ones(b, b, dtype=s.dtype, device=s.device)
    if not include_diagonal:
        keep = keep - torch.eye(b, dtype=s.dtype, device=s.device)

    def conditional(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
        k = 0.5 * (x @ x.t() + 1.0) * keep
        return k / k.sum(dim=1, keepdim=True)

    p_s = conditional(s)
    p_t = conditional(t)
    total = (p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))).sum()
    return total / (b * b) if reduction == "mean" else total / b


# --------------------------------------------------------------------------- CC


CC_FORMS = ("kernel", "delta_product")


def cc_loss(s: torch.Tensor, t: torch.Tensor, gamma: float = 0.4, order: int = 2, form: str = "kernel") -> torch.Tensor:
    """Peng et al. ICCV 2019 (CCKD), L_CC = 1/n^2 ||psi(F_t) - psi(F_s)||^2 with the Taylor-expanded Gaussian RBF.

    s: (n, D_s), t: (n, D_t) embeddings (more dimensions are flattened).
    Each embedding is L2-normalised first, since the expansion
    exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma x.y) needs ||x|| = ||y|| = 1. Then
    C_ij = sum_{p=0}^{order} exp(-2 gamma) (2 gamma)^p / p! (x_i . x_j)^p, and the loss is the
    mean over the n^2 entries of (C_s - C_t)^2, the paper's 1/n^2 normalisation.

    `form="delta_product"` is the simplified loss the CRD benchmark runs instead (its `Correlation`, the
    code the CC authors shared): with delta_i = |s_i - t_i| (s and t of one shape, not normalised; gamma
    and order unused), the mean over the n - 1 neighbouring pairs of the batch of sum_d delta_i,d delta_i+1,d.
    """
    if form not in CC_FORMS:
        raise ValueError(f"cc_loss: form must be one of {CC_FORMS}, got {form!r}")
    _same_batch(s, t, "cc_loss")
    if form == "delta_product":
        _min_batch(s, 2, "cc_loss")
        _same_shape(s.flatten(1), t.flatten(1), "cc_loss")
        delta = (s.flatten(1) - t.flatten(1)).abs()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
    coeffs = [math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) for p in range(order + 1)]

    def correlation(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.flatten(1), p=2, dim=1)
        m = x @ x.t()
        c = torch.full_like(m, coeffs[0])
        for p in range(1, order + 1):
            c = c + coeffs[p] * m.pow(p)
        return c

    return (correlation(s) - correlation(t)).pow(2).mean()


# --------------------------------------------------------------------------- NST


def nst_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Huang & Wang 2017 (NST, Like What You Like), squared MMD with the polynomial kernel k(x, y) = (x^T y)^2.

    s: (B, C_s, H, W), t: (B, C_t, H, W); channel counts may differ, spatial sizes
    must match (ValueError otherwise). Each channel's flattened H*W map is one sample
    of the distribution and is L2-normalised. Per input:
        MMD^2 = mean_{i,i'} k(f_t^i, f_t^i') + mean_{j,j'} k(f_s^j, f_s^j') - 2 mean_{i,j} k(f_t^i, f_s^j),
    averaged over the batch. The paper's lambda/2 factor is the caller's weight.
    """
    _same_spatial(s, t, "nst_loss")
    fs = F.normalize(s.flatten(2), p=2, dim=2)
    ft = F.normalize(t.flatten(2), p=2, dim=2)
    k_tt = (ft @ ft.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    k_ss = (fs @ fs.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    k_ts = (ft @ fs.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    return (k_tt + k_ss - 2.0 * k_ts).mean()


# --------------------------------------------------------------------------- FSP


def fsp_matrix(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Yim et al. CVPR 2017 (FSP), eq. (1): G_ij = sum_{h,w} F1_{h,w,i} F2_{h,w,j} / (h * w).

    feat_a: (B, C1, H, W), feat_b: (B, C2, H, W) with the same spatial size
    (ValueError otherwise; the caller pools). Returns (B, C1, C2).
    """
    _same_spatial(feat_a, feat_b, "fsp_matrix")
    hw = math.prod(feat_a.shape[2:])
    return feat_a.flatten(2) @ feat_b.flatten(2).transpose(1, 2) / hw


def fsp_loss(
    student_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    teacher_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Yim et al. CVPR 2017 (FSP), eq. (2): 1/N sum_x sum_i lambda_i ||G_i^T(x) - G_i^S(x)||_2^2, lambda_i = 1.

    student_pairs, teacher_pairs: equally long sequences of (feat_a, feat_b) feature-map
    pairs, see `fsp_matrix`; the i-th student FSP matrix must have the i-th teacher's
    shape. ||.||_2^2 is the sum of the squared entries of the C1 x C2 matrix; it is
    averaged over the batch (1/N) and SUMMED over the pairs (the paper sets all
    lambda_i equal; the common weight is the caller's). `reduction="mean"` also averages
    over the C1 x C2 entries, as the CRD benchmark's FSP code does.
    """
    _check_reduction(reduction, "fsp_loss")
    if len(student_pairs) != len(teacher_pairs) or not student_pairs:
        raise ValueError(
            f"fsp_loss: needs the same, non-zero number of student and teacher pairs "
            f"(got {len(student_pairs)} and {len(teacher_pairs)})"
        )
    total = None
    for (sa, sb), (ta, tb) in zip(student_pairs, teacher_pairs):
        g_s = fsp_matrix(sa, sb)
        g_t = fsp_matrix(ta, tb)
        _same_shape(g_s, g_t, "fsp_loss")
        sq = (g_s - g_t).pow(2)
        term = sq.mean() if reduction == "mean" else sq.sum(dim=(1, 2)).mean()
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------- AB


def ab_loss(student_pre_relu: torch.Tensor, teacher_pre_relu: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Heo et al. AAAI 2019 (activation boundaries), alternative loss ||rho(T)*relu(mu-S) + (1-rho(T))*relu(mu+S)||^2.

    The squared norm of rho(T) * relu(mu 1 - r(S)) + (1 - rho(T)) * relu(mu 1 + r(S)).
    student_pre_relu: r(S(I)), the connector output before ReLU; teacher_pre_relu: T(I)
    before ReLU; same shape, (B, C, H, W) or (B, D). rho(x) = 1[x > 0], mu = `margin`.
    The squared norm is summed over all neurons of one input and averaged over the
    batch. Zero exactly when every student response is on the teacher's side of the
    activation boundary by at least the margin.
    """
    _same_shape(student_pre_relu, teacher_pre_relu, "ab_loss")
    return _BoundaryL2.apply(student_pre_relu, teacher_pre_relu, margin)


class _BoundaryL2(torch.autograd.Function):
    """AB's loss with one saved tensor: with sign = +1 where T > 0 and -1 else, d = relu(mu - sign * S) (relu(mu - S)
    where rho(T) = 1, relu(mu + S) else), the loss sum(d^2) / B and its gradient -2 sign d / B, no gradient to the
    teacher (it enters only through its sign): one multiply backward, where autograd took a pass per forward
    operation over every teacher-sized map (3.3x faster on the default pair's largest, measured)."""

    @staticmethod
    def forward(ctx, student, teacher, margin):
        sign = (teacher > 0).to(student.dtype).mul_(2).sub_(1)
        d = student.mul(sign).neg_().add_(margin).clamp_(min=0)
        flat = d.reshape(-1)
        loss = torch.dot(flat, flat) / student.shape[0]
        ctx.save_for_backward(d.mul_(sign))
        return loss

    @staticmethod
    def backward(ctx, grad):
        (signed,) = ctx.saved_tensors
        return signed * (grad * -2.0 / signed.shape[0]), None, None


# --------------------------------------------------------------------------- FT


def ft_loss(
    student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 1, reduction: str = "batchmean",
    reduce_channels: bool = False,
) -> torch.Tensor:
    """Kim et al. NeurIPS 2018 (factor transfer), L_FT = || F_T/||F_T||_2 - F_S/||F_S||_2 ||_p per sample, batch mean.

    student_factor, teacher_factor: the translator / paraphraser outputs, same shape,
    (B, C, H, W) or (B, D); each is vectorised and L2-normalised per sample. p = 1 in
    the paper. `reduction="mean"` returns the mean over elements of |difference|^p (for
    p = 1, this value divided by the number of elements per sample). `reduce_channels=True`
    first replaces each (B, C, H, W) factor by its mean over channels of the squares,
    mean_c F_c^2 (B, H*W), as the CRD benchmark's FactorTransfer does; with `reduction="mean"`
    and p = 1 that is the benchmark's loss.
    """
    _same_shape(student_factor, teacher_factor, "ft_loss")
    _check_reduction(reduction, "ft_loss")
    if reduce_channels:
        _spatial(student_factor, "ft_loss")
        student_factor, teacher_factor = student_factor.pow(2).mean(dim=1), teacher_factor.pow(2).mean(dim=1)
    fs = F.normalize(student_factor.flatten(1), p=2, dim=1)
    ft = F.normalize(teacher_factor.flatten(1), p=2, dim=1)
    if reduction == "mean":
        return (fs - ft).abs().pow(p).mean()
    return torch.linalg.vector_norm(fs - ft, ord=p, dim=1).mean()


# --------------------------------------------------------------------------- VID


def vid_loss(
    student_mean: torch.Tensor,
    teacher_feat: torch.Tensor,
    log_scale: torch.Tensor,
    eps: float = 1e-5,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Ahn et al. CVPR 2019 (VID), -log q(t|s) = sum_{c,h,w} [ log sigma_c + (t - mu(s))^2 / (2 sigma_c^2) ].

    student_mean: mu(s), the student-side regressor output; teacher_feat: t; both
    (B, C, H, W) or (B, C). log_scale: (C,), the paper's alpha_c, with the
    per-channel variance sigma_c^2 = softplus(alpha_c) + eps (it is NOT log sigma).
    The constant (HW/2) log(2 pi) per channel is dropped, so the value can be negative.
    Summed over channels and positions, averaged over the batch (the paper's expectation
    over data); the benchmark code averages over every element instead, which is this
    value divided by C*H*W. The minimum over mu(s) is at mu(s) = t; its value there is
    sum_c (H*W/2) log sigma_c^2, not zero, since sigma is learned too.
    `reduction="mean"` averages over every element (the benchmark's form, weight 1 per layer).
    """
    _same_shape(student_mean, teacher_feat, "vid_loss")
    _check_reduction(reduction, "vid_loss")
    c = teacher_feat.shape[1]
    if log_scale.shape != (c,):
        raise ValueError(f"vid_loss: log_scale must have shape ({c},), got {tuple(log_scale.shape)}")
    var = (F.softplus(log_scale) + eps).view(1, c, *([1] * (teacher_feat.dim() - 2)))
    nll = 0.5 * torch.log(var) + (teacher_feat - student_mean).pow(2) / (2.0 * var)
    if reduction == "mean":
        return nll.mean()
    return nll.flatten(1).sum(dim=1).mean()


# --------------------------------------------------------------------------- OFD


def ofd_margin(bn_mean: torch.Tensor, bn_std: torch.Tensor) -> torch.Tensor:
    """Heo et al. ICCV 2019 (overhaul of feature distillation), margin m = E[x | x < 0] for x ~ N(mean, std^2).

    bn_mean, bn_std: (C,), the per-channel mean and standard deviation of the teacher's
    pre-ReLU response (the paper takes them from the preceding batch-norm layer).
    Closed form of the truncated normal: m = mean - std * phi(mean/std) / Phi(-mean/std),
    evaluated with log Phi for stability (tends to 0 from below when mean >> std).
    Returns (C,), every entry negative.
    """
    a = bn_mean / bn_std
    log_pdf = -0.5 * a * a - 0.5 * math.log(2.0 * math.pi)
    ratio = torch.exp(log_pdf - torch.special.log_ndtr(-a))
    return bn_mean - bn_std * ratio


def ofd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Heo et al. ICCV 2019 (overhaul of feature distillation), partial L2 d_p(sigma_m(T), r(S)) / B.

    student_feat: r(S), the connector output, and teacher_feat: T, the teacher's pre-ReLU
    feature, same shape (B, C, H, W) or (B, C); margin: (C,) (see `ofd_margin`),
    broadcast over the channels. The target is the margin ReLU sigma_m(T) = max(T, m).
    Per element the squared difference (target - S)^2 is counted except where
    S <= target <= 0 (the teacher is negative, i.e. inactive, and the student is
    already below it); summed over all elements and divided by the batch size.
    """
    _same_shape(student_feat, teacher_feat, "ofd_loss")
    c = teacher_feat.shape[1]
    if margin.shape != (c,):
        raise ValueError(f"ofd_loss: margin must have shape ({c},), got {tuple(margin.shape)}")
    m = margin.to(device=teacher_feat.device, dtype=teacher_feat.dtype).view(1, c, *([1] * (teacher_feat.dim() - 2)))
    return _PartialL2.apply(student_feat, teacher_feat, m)


class _PartialL2(torch.autograd.Function):
    """OFD's partial L2 with one saved tensor: d = max(T, m) - S, set to 0 where S <= target <= 0 (where the target
    is not positive, d is min(d, 0)); the loss is sum(d^2) / B, its gradient -2 d / B for S (and 2 d / B where
    T > m for an undetached teacher), so the backward is one multiply where autograd took a pass per forward
    operation: the loss is elementwise work over every teacher-sized map, comparable to small networks' own."""

    @staticmethod
    def forward(ctx, student, teacher, margin):
        target = torch.maximum(teacher, margin)
        d = target - student
        d.masked_fill_((target <= 0) & (d > 0), 0)  # 2x faster here than torch.where with a clamp
        ctx.save_for_backward(d, teacher if ctx.needs_input_grad[1] else None, margin)
        flat = d.reshape(-1)
        return torch.dot(flat, flat) / student.shape[0]

    @staticmethod
    def backward(ctx, grad):
        d, teacher, margin = ctx.saved_tensors
        scale = grad * 2.0 / d.shape[0]
        return d * -scale, (d * scale * (teacher > margin) if teacher is not None else None), None


# --------------------------------------------------------------------------- ReviewKD


_HCL_LEVELS = (4, 2, 1)


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chen et al. CVPR 2021 (ReviewKD), hierarchical context loss: pyramid-pooled MSE, summed over stage pairs.

    student_feats, teacher_feats: equally long sequences of (B, C, H, W) maps, the
    i-th student map of the i-th teacher map's shape. For one pair: the MSE (mean over
    elements) at full resolution with weight 1, plus the MSE after adaptive average
    pooling to 4x4, 2x2 and 1x1, the weight halving at each level used (1/2, 1/4, 1/8
    for maps larger than 4x4); the weighted sum is divided by the sum of the weights
    used. A pooling level l is used only when it is smaller than the map
    (l < min(H, W)), since pooling to a size not below the map's makes no coarser
    level (for an 8x8 map: levels 4, 2, 1; for 4x4: levels 2, 1 with weights 1/2, 1/4).
    The paper only describes spatial pyramid pooling and a weighted sum of the level
    losses; the levels (4, 2, 1) and the halving weights follow the authors' released
    implementation.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"hcl_loss: needs the same, non-zero number of student and teacher maps "
            f"(got {len(student_feats)} and {len(teacher_feats)})"
        )
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        _same_shape(fs, ft, "hcl_loss")
        h, w = _spatial(fs, "hcl_loss")
        diff = fs - ft  # pooling is linear: pool(fs) - pool(ft) = pool(fs - ft), one pooling per level
        loss = diff.pow(2).mean()
        weight, weight_sum = 1.0, 1.0
        for level in _HCL_LEVELS:
            if level >= min(h, w):
                continue
            weight /= 2.0
            loss = loss + weight * F.adaptive_avg_pool2d(diff, (level, level)).pow(2).mean()
            weight_sum += weight
        term = loss / weight_sum
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------- CRD


def crd_nce_loss(pos: torch.Tensor, neg: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """Tian et al. ICLR 2020 (CRD), eq. (18): the NCE objective on one critic, negated and averaged over the batch.

    pos: (B,) and neg: (B, N), the critic's unnormalised scores P = exp(f_T . f_S / tau) / Z of each
    anchor's positive pair and of its N negatives (Z the normalising constant, estimated by the caller).
    With the noise distribution uniform over the M = `num_data` training samples,
    h(x) = P(x) / (P(x) + N / M); the loss is -(log h(pos) + sum_j log(1 - h(neg_j))), batch mean.
    `eps` guards the divisions, as in the authors' code.
    """
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(
            f"crd_nce_loss: expected pos (B,) and neg (B, N), got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    noise = neg.shape[1] / num_data
    log_h_pos = torch.log(pos / (pos + noise + eps))
    log_1_minus_h_neg = torch.log(noise / (neg + noise + eps))
    return -(log_h_pos + log_1_minus_h_neg.sum(dim=1)).mean()


# --------------------------------------------------------------------------- KD-SVD


class _TopSingular(torch.autograd.Function):
    """The top-k singular values (B, k) and right singular vectors (B, C, k) of a batch of (B, M, C) matrices,
    differentiated through those k triplets only.

    With A = U S V^T (K triplets), W = A V = U S, v_i = A^T u_i / s_i and for i <= k
        dv_i = sum_{j != i} v_j (s_j u_j^T dA v_i + s_i u_i^T dA v_j) / (s_i^2 - s_j^2) + (I - V V^T) dA^T u_i / s_i,
        ds_i = u_i^T dA v_i,
    written with W so that U is never needed. This is torch's SVD gradient without the pairs j, j' > k, whose
    terms are 0 / (s_j^2 - s_j'^2): NaN once two of the unused singular values are equal, as the zero ones of a
    rank-deficient map are (a feature map with repeated positions, e.g. a uniform background). Where the gradient
    is genuinely undefined (s_i = s_j for i <= k, or s_i = 0) the non-finite factors 1 / (s_i^2 - s_j^2) and
    1 / s_i are set to 0, as in the authors' SVD gradient.

    `signed`: the vectors keep LAPACK's SVD signs (the loss depends on them). Otherwise (vectors whose sign the
    caller fixes itself) they come from an eigendecomposition of the smaller Gram matrix, A^T A (then K = C) or
    A A^T (K = M), a fraction of the SVD's cost for a feature map's (H*W, C) matrix.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, signed: bool):
        threads = torch.get_num_threads()
        if x.device.type == "cpu":  # threaded LAPACK on a busy CPU: (128, 196, 32) in 20 s; on one thread, 22 ms
            torch.set_num_threads(1)
        try:
            if signed:
                u, s, vh = torch.linalg.svd(x, full_matrices=False)
                w, lam = u * s.unsqueeze(1), s * s
            elif x.shape[1] >= x.shape[2]:  # the (C, C) Gram matrix A^T A: V, and W = A V
                lam, v = torch.linalg.eigh(x.transpose(1, 2) @ x)  # ascending
                lam, vh = lam.flip(-1).clamp(min=0), v.flip(-1).transpose(1, 2)
                s, w = lam.sqrt(), x @ vh.transpose(1, 2)
            else:  # the (M, M) Gram matrix A A^T: U, then V^T = S^-1 U^T A (zero rows where s = 0)
                lam, u = torch.linalg.eigh(x @ x.transpose(1, 2))
                lam, u = lam.flip(-1).clamp(min=0), u.flip(-1)
                s = lam.sqrt()
                inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
                w, vh = u * s.unsqueeze(1), inv.unsqueeze(2) * (u.transpose(1, 2) @ x)
        finally:
            torch.set_num_threads(threads)
        ctx.save_for_backward(w, lam, vh)
        ctx.k = k
        return s[:, :k], vh[:, :k].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor | None, grad_v: torch.Tensor | None):
        w, lam, vh = ctx.saved_tensors
        k = ctx.k
        w_k, lam_k, vh_k = w[:, :, :k], lam[:, :k], vh[:, :k]
        grad = torch.zeros(w.shape[0], w.shape[1], vh.shape[2], dtype=w.dtype, device=w.device)
        if grad_s is not None:  # u_k diag(grad_s) v_k^T, u_k = w_k / s_k
            inv_s = torch.where(lam_k > 0, lam_k.rsqrt(), torch.zeros_like(lam_k))
            grad = grad + w_k @ ((grad_s * inv_s).unsqueeze(2) * vh_k)
        if grad_v is not None:
            c = vh @ grad_v  # (B, K, k): v_j . grad_v_i
            f = 1.0 / (lam_k.unsqueeze(1) - lam.unsqueeze(2))  # (B, K, k): 1 / (s_i^2 - s_j^2)
            g = c * torch.where(torch.isfinite(f), f, torch.zeros_like(f))
            grad = grad + w @ g @ vh_k + w_k @ g.transpose(1, 2) @ vh
            if vh.shape[2] > vh.shape[1]:  # C > K: the part of grad_v outside A's row space, u_i / s_i = w_i / s_i^2
                inv = torch.where(lam_k > 0, 1.0 / lam_k, torch.zeros_like(lam_k))
                grad = grad + w_k @ (inv.unsqueeze(2) * (grad_v - vh.transpose(1, 2) @ c).transpose(1, 2))
        return grad, None, None


def _top_singular(feat: torch.Tensor, k: int, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the top-k right singular vectors (B, C, k) and singular values (B, k) of the (H*W, C)
    matrix of a (B, C, H, W) map, each L2-normalised (vectors over C, values over k); NaN/inf set to 0.
    Differentiated through the top k triplets only (`_TopSingular`; `signed`: LAPACK's signs)."""
    s, v = _TopSingular.apply(feat.flatten(2).transpose(1, 2), k, signed)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    return F.normalize(v, dim=1), F.normalize(s, dim=1)


def kdsvd_loss(
    student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], k: int = 1
) -> torch.Tensor:
    """Lee, Kim & Song ECCV 2018 (KD-SVD), the distillation of the singular-vector correlation between layers.

    student_feats, teacher_feats: equally long sequences (at least two) of (B, C_l, H_l, W_l) maps, the
    l-th student map with the l-th teacher map's channel count. Per map and sample: truncated SVD of the
    (H*W, C) matrix; the teacher keeps its top k right singular vectors, the student its top k + 3, each
    teacher vector being matched by the student vector of largest |cosine| (its sign flipped to agree);
    both are scaled by the teacher's normalised singular values. The knowledge of layers l-1, l is the
    radial basis function G[c, c', i] = exp(-(v_l[c, i] - v_{l-1}[c', i])^2 / 8) over every pair of
    entries of the i-th vectors; the loss is sum over consecutive pairs of ||G_S - G_T||^2 summed over
    entries and averaged over the batch (non-finite terms dropped). The k + 3 candidates, the alignment
    and sigma = 8 follow the authors' released code.
    """
    if len(student_feats) != len(teacher_feats) or len(student_feats) < 2:
        raise ValueError(f"kdsvd_loss: needs the same number (at least 2) of student and teacher maps, "
                         f"got {len(student_feats)} and {len(teacher_feats)}")
    total, prev = None, None
    for fs, ft in zip(student_feats, teacher_feats):
        _same_batch(fs, ft, "kdsvd_loss")
        if fs.shape[1] != ft.shape[1]:
            raise ValueError(f"kdsvd_loss: singular vectors are compared channel by channel, but the student has "
                             f"{fs.shape[1]} channels and the teacher {ft.shape[1]}")
        v_t, s_t = _top_singular(ft, k)
        v_s, _ = _top_singular(fs, k + 3, signed=False)  # its signs are set by the alignment below
        cos = v_s.transpose(1, 2) @ v_t  # (B, k + 3, k)
        best = cos.abs() == cos.abs().amax(dim=1, keepdim=True)
        v_s = v_s @ torch.where(best, torch.sign(cos), torch.zeros_like(cos))
        v_s, v_t = v_s * s_t.unsqueeze(1), v_t * s_t.unsqueeze(1)
        if prev is not None:
            def rbf(a, b):
                return torch.exp(-(a.unsqueeze(2) - b.unsqueeze(1)).pow(2) / 8)

            sq = (rbf(v_s, prev[0]) - rbf(v_t, prev[1])).pow(2)
            term = torch.where(torch.isfinite(sq), sq, torch.zeros_like(sq)).sum() / fs.shape[0]
            total = term if total is None else total + term
        prev = (v_s, v_t)
    return total
