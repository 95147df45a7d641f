"""Each method's losses on small fixed tensors against its formula written out by hand (as its docstring and
paper state it), so that a swapped weight, a missing temperature power, a reversed divergence or a wrong
ramp fails. The expected values use plain torch ops only, never kdrun.losses. MPL: tests/test_self_training.py."""

import contextlib
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdrun.methods.ab import AB
from kdrun.methods.at import AT
from kdrun.methods.cc import CC
from kdrun.methods.crd import CRD
from kdrun.methods.data_distillation import DataDistillation
from kdrun.methods.dist import DIST
from kdrun.methods.dkd import DKD
from kdrun.methods.eskd import ESKD
from kdrun.methods.fitnet import FitNet
from kdrun.methods.fsp import FSP
from kdrun.methods.ft import FT
from kdrun.methods.funmatch import FunMatch
from kdrun.methods.kd import KD
from kdrun.methods.kdsvd import KDSVD
from kdrun.methods.multi_teacher import MultiTeacher
from kdrun.methods.noisy_student import NoisyStudent
from kdrun.methods.nst import NST
from kdrun.methods.ofd import OFD
from kdrun.methods.pkt import PKT
from kdrun.methods.pseudo_label import PseudoLabel
from kdrun.methods.reviewkd import ReviewKD
from kdrun.methods.rkd import RKD
from kdrun.methods.sp import SP
from kdrun.methods.supervised import Supervised
from kdrun.methods.vid import VID
from kdrun.models.ensemble import Ensemble

DT = torch.float64
BN_EVAL = 1 / math.sqrt(1 + 1e-5)  # a fresh BatchNorm in eval mode: running mean 0, variance 1


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _linear(n_in, n_out, seed):
    layer = nn.Linear(n_in, n_out).to(DT)
    with torch.no_grad():
        layer.weight.copy_(_randn(n_out, n_in, seed=seed))
        layer.bias.copy_(_randn(n_out, seed=seed + 1))
    return layer


def _apply(layer, x):
    return x @ layer.weight.T + layer.bias


def _close(actual, expected, rtol=1e-9):
    torch.testing.assert_close(actual.detach().double(), torch.as_tensor(expected).detach().double(),
                               rtol=rtol, atol=1e-12)


def _log_p(z, temperature=1.0):
    return torch.log_softmax(z / temperature, dim=1)


def _ce(z, y):
    return -_log_p(z)[torch.arange(len(y)), y].mean()


def _kl(p_logits, q_logits, temperature=1.0):
    lp, lq = _log_p(p_logits, temperature), _log_p(q_logits, temperature)
    return (lp.exp() * (lp - lq)).sum(1).mean()


def _zscore(z):
    mean = z.mean(1, keepdim=True)
    return (z - mean) / (((z - mean) ** 2).mean(1, keepdim=True).sqrt() + 1e-7)


def _pool(x, size):
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean((3, 5))


def _conv1x1(conv, x):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)


def _unit_rows(x):
    x = x.flatten(1)
    return x / (x ** 2).sum(1, keepdim=True).sqrt()


class _Loop:
    """What a method's `step` reads of the engine's loop: the epoch, autocast, and optimize (recorded here)."""

    def __init__(self, epoch=0, unlabeled=()):
        self.epoch, self.unlabeled, self.optimized = epoch, unlabeled, []

    def autocast(self):
        return contextlib.nullcontext()

    def optimize(self, loss):
        self.optimized.append(loss)

    def batches(self, on):
        assert on == "unlabeled"
        return self.unlabeled

    def log(self, row):
        pass


X = _randn(4, 3, seed=1)
Y = torch.tensor([2, 0, 1, 3])
BATCH = {"image": X, "label": Y}


def _pair():
    """A linear student and teacher over 3 inputs and 4 classes, and their logits on X."""
    student, teacher = _linear(3, 4, seed=5), _linear(3, 4, seed=3)
    return student, teacher, _apply(student, X), _apply(teacher, X)


class TwoStage(nn.Module):
    """Two conv-ReLU stages on a 1x4x4 image (the second at 2x2), global average pooling, a linear classifier."""

    default_feature_layers = ["stage1", "stage2"]

    def __init__(self, c1, c2, classes=3):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(x)).mean((2, 3)))


IMAGES = _randn(3, 1, 4, 4, seed=11)
IMAGE_BATCH = {"image": IMAGES, "label": torch.tensor([0, 2, 1]), "index": torch.tensor([0, 3, 5])}


def _feature_method(cls, s_widths=(2, 3), t_widths=(3, 4), data=None, **kwargs):
    """`cls` on TwoStage student and teacher, set up for a 1x4x4 dataset as kdrun.run does, in float64, eval mode."""
    torch.manual_seed(0)
    method = cls(TwoStage(*s_widths), TwoStage(*t_widths), **kwargs)
    method.setup(data or SimpleNamespace(in_chans=1, image_size=4))
    return method.double().eval()


def _stages(net, x):
    """(pre-ReLU, post-ReLU) responses of both stages of a TwoStage net."""
    pre1 = net.stage1[0](x)
    post1 = pre1.relu()
    pre2 = net.stage2[0](post1)
    return (pre1, pre2), (post1, pre2.relu())


# ---------------------------------------------------------------------------------------------- logits


def test_supervised_is_cross_entropy_with_label_smoothing():
    """CE with label smoothing eps: (1 - eps) * -log p_y + eps * mean_k -log p_k (Szegedy et al. 2016)."""
    student, _, s, _ = _pair()
    losses, _ = Supervised(student, label_smoothing=0.2).training_step(BATCH)
    smooth = -_log_p(s).mean(1).mean()
    _close(losses["ce"], 0.8 * _ce(s, Y) + 0.2 * smooth)


def test_kd_weights_ce_by_one_minus_alpha_and_kl_by_alpha_t_squared():
    """Hinton et al. 2015: (1 - alpha) CE + alpha T^2 KL(softmax(t/T) || softmax(s/T))."""
    student, teacher, s, t = _pair()
    losses, _ = KD(student, teacher, temperature=2.5, alpha=0.3).training_step(BATCH)
    assert set(losses) == {"ce", "kd"}
    _close(losses["ce"], 0.7 * _ce(s, Y))
    _close(losses["kd"], 0.3 * 2.5 ** 2 * _kl(t, s, 2.5))


def test_kd_weight_replaces_alpha_on_the_kl_and_the_ce_keeps_one_minus_alpha():
    """kd.py: kd_weight is the KD term's weight, the CE keeps 1 - alpha: 0.7 CE + 5 T^2 KL(p_t || p_s)."""
    student, teacher, s, t = _pair()
    losses, _ = KD(student, teacher, temperature=3.0, alpha=0.3, kd_weight=5.0).training_step(BATCH)
    _close(losses["ce"], 0.7 * _ce(s, Y))
    _close(losses["kd"], 5.0 * 9.0 * _kl(t, s, 3.0))


def test_kd_with_logit_standardization_z_scores_both_logits_before_the_temperature():
    """Sun et al. CVPR 2024, Algorithm 1: Z(z) = (z - mean) / std (population std, over classes), then
    kd_weight T^2 KL(softmax(Z(t)/T) || softmax(Z(s)/T)); the CE is on the raw logits."""
    student, teacher, s, t = _pair()
    method = KD(student, teacher, temperature=2.0, alpha=0.9, kd_weight=9.0, logit_standardization=True)
    losses, _ = method.training_step(BATCH)
    _close(losses["ce"], 0.1 * _ce(s, Y))
    _close(losses["kd"], 9.0 * 4.0 * _kl(_zscore(t), _zscore(s), 2.0))


@pytest.mark.parametrize("kd_weight, soft_weight", [(None, 0.4), (2.0, 2.0)])
def test_eskd_is_kd_until_the_stop_then_plain_cross_entropy(kd_weight, soft_weight):
    """Cho & Hariharan ICCV 2019: (1 - alpha) CE + w T^2 KL(p_t || p_s) up to the stop epoch, then CE alone
    (weight 1); the kd_weight metric is w (alpha, or kd_weight), then 0."""
    student, teacher, s, t = _pair()
    method = ESKD(student, teacher, stop_epoch=2, temperature=3.0, alpha=0.4, kd_weight=kd_weight)
    kd_stage, ce_stage = method.stages(5)
    method.on_stage_start(kd_stage, None)
    losses, metrics = method.training_step(BATCH)
    _close(losses["ce"], 0.6 * _ce(s, Y))
    _close(losses["kd"], soft_weight * 9.0 * _kl(t, s, 3.0))
    assert float(metrics["kd_weight"]) == pytest.approx(soft_weight)
    method.on_stage_start(ce_stage, None)
    losses, metrics = method.training_step(BATCH)
    assert set(losses) == {"ce"}
    _close(losses["ce"], _ce(s, Y))
    assert float(metrics["kd_weight"]) == 0.0


def test_funmatch_is_kl_from_the_teacher_to_the_student_without_labels():
    """Beyer et al. CVPR 2022: KL(p_teacher || p_student) on the same input, labels unused; agreement is the
    fraction of equal argmaxes."""
    student, teacher, s, t = _pair()
    method = FunMatch(student, teacher, teacher_view="consistent", temperature=1.0)
    losses, metrics = method.training_step({"image": X})
    _close(losses["kl"], _kl(t, s))
    _close(metrics["agreement"], (s.argmax(1) == t.argmax(1)).double().mean())


def _tckd_nckd(s, t, y, temperature):
    p_s, p_t = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
    rows = torch.arange(len(y))
    b_s = torch.stack([p_s[rows, y], 1 - p_s[rows, y]], 1)
    b_t = torch.stack([p_t[rows, y], 1 - p_t[rows, y]], 1)
    tckd = (b_t * (b_t / b_s).log()).sum(1).mean()
    others = torch.ones_like(p_s, dtype=torch.bool)
    others[rows, y] = False
    hat_s = p_s[others].view(len(y), -1) / b_s[:, 1:]
    hat_t = p_t[others].view(len(y), -1) / b_t[:, 1:]
    nckd = (hat_t * (hat_t / hat_s).log()).sum(1).mean()
    return temperature ** 2 * tckd, temperature ** 2 * nckd


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("epoch, ramp", [(0, 0.1), (4, 0.5), (9, 1.0), (25, 1.0)])
def test_dkd_ramps_alpha_tckd_plus_beta_nckd_by_epoch_plus_one_over_warmup(epoch, ramp, standardize):
    """Zhao et al. CVPR 2022, eq. 7 with mdistiller's warm-up: ce_weight CE +
    min((epoch + 1) / warmup, 1) (alpha TCKD + beta NCKD), TCKD = T^2 KL(b_t || b_s) of [p_y, 1 - p_y],
    NCKD = T^2 KL(p^_t || p^_s) over the non-target classes; Z-scored logits with logit_standardization."""
    student, teacher, s, t = _pair()
    method = DKD(student, teacher, alpha=1.5, beta=3.0, temperature=2.0, warmup_epochs=10, ce_weight=0.7,
                 logit_standardization=standardize)
    loop = _Loop(epoch)
    losses, _ = method.step(BATCH, loop)
    tckd, nckd = _tckd_nckd(*((_zscore(s), _zscore(t)) if standardize else (s, t)), Y, 2.0)
    _close(losses["ce"], 0.7 * _ce(s, Y))
    _close(losses["dkd"], ramp * (1.5 * tckd + 3.0 * nckd))
    _close(loop.optimized[0], losses["ce"] + losses["dkd"])


def _pearson(a, b, dim):
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / ((a ** 2).sum(dim) * (b ** 2).sum(dim)).sqrt()


def test_dist_weights_inter_by_beta_and_intra_by_gamma_at_t_squared():
    """Huang et al. NeurIPS 2022, Sec. 3: ce_weight CE + T^2 (beta (1 - mean_i rho(Ys_i, Yt_i))
    + gamma (1 - mean_j rho(Ys_:j, Yt_:j))), Y = softmax(z/T), rho the Pearson correlation."""
    student, teacher, s, t = _pair()
    losses, _ = DIST(student, teacher, beta=1.0, gamma=3.0, temperature=2.0, ce_weight=0.5).training_step(BATCH)
    y_s, y_t = torch.softmax(s / 2.0, 1), torch.softmax(t / 2.0, 1)
    inter, intra = 1 - _pearson(y_s, y_t, 1).mean(), 1 - _pearson(y_s, y_t, 0).mean()
    _close(losses["ce"], 0.5 * _ce(s, Y))
    _close(losses["dist"], 4.0 * (1.0 * inter + 3.0 * intra))


@pytest.mark.parametrize("weights, mix", [(None, (0.5, 0.5)), ([1.0, 3.0], (0.25, 0.75))])
def test_multi_teacher_distils_the_weighted_mixture_of_the_teachers_softmaxes(weights, mix):
    """Hinton et al. 2015 / You et al. KDD 2017: (1 - alpha) CE + alpha T^2 KL(sum_m w_m softmax(z_m/T) ||
    softmax(s/T)), w uniform or the given weights normalised."""
    student = _linear(3, 4, seed=5)
    t1, t2 = _linear(3, 4, seed=3), _linear(3, 4, seed=21)
    method = MultiTeacher(student, Ensemble([t1, t2], ["a", "b"]), temperature=2.0, alpha=0.6, weights=weights)
    method.setup(None)
    losses, _ = method.training_step(BATCH)
    s = _apply(student, X)
    q = mix[0] * torch.softmax(_apply(t1, X) / 2.0, 1) + mix[1] * torch.softmax(_apply(t2, X) / 2.0, 1)
    _close(losses["ce"], 0.4 * _ce(s, Y))
    _close(losses["kd"], 0.6 * 4.0 * (q * (q.log() - _log_p(s, 2.0))).sum(1).mean())


# ---------------------------------------------------------------------------------------------- features


def test_fitnet_stage_one_is_the_weighted_hint_mse_of_the_regressor_alone():
    """Romero et al. ICLR 2015, eq. 3 as the benchmark's MSE: weight * mean((r(v_g) - u_h)^2), r a 1x1 conv
    + BN + ReLU (the hint is a ReLU output), no cross-entropy in the hint stage."""
    method = _feature_method(FitNet, hint_epochs=2, weight=50.0)
    method.on_stage_start(method.stages(5)[0], None)
    losses, _ = method.training_step(IMAGE_BATCH)
    (_, (guided, _)), (_, (hint, _)) = _stages(method.student, IMAGES), _stages(method.teacher, IMAGES)
    regressed = (_conv1x1(method.regressor[0], guided) * BN_EVAL).relu()
    assert set(losses) == {"hint"}
    _close(losses["hint"], 50.0 * ((regressed - hint) ** 2).mean())


@pytest.mark.parametrize("epoch, lam", [(2, 4.0), (3, 3.25), (4, 2.5), (6, 1.0), (9, 1.0)])
def test_fitnet_stage_two_is_ce_plus_annealed_lambda_times_the_unscaled_soft_kl(epoch, lam):
    """Romero et al. ICLR 2015, eq. 2: CE + lambda H(P_T^tau, P_S^tau), the student-dependent part
    KL(P_T^tau || P_S^tau) without T^2, lambda linear from 4 (first KD epoch) to 1 (last) over the stage."""
    method = _feature_method(FitNet, hint_epochs=2, temperature=3.0, lambda_start=4.0, lambda_end=1.0)
    method.on_stage_start(method.stages(5)[1], None)
    losses, _ = method.step(IMAGE_BATCH, _Loop(epoch))
    s, t = method.student(IMAGES), method.teacher(IMAGES)
    assert set(losses) == {"ce", "kd"}
    _close(losses["ce"], _ce(s, IMAGE_BATCH["label"]))
    _close(losses["kd"], lam * _kl(t, s, 3.0))


def test_fitnet_one_stage_sums_weighted_ce_kd_and_hint():
    """The CRD benchmark's one-stage FitNet on the feature base: ce_weight CE + kd_weight T^2 KL(p_t || p_s)
    + weight * MSE(r(v_g), u_h)."""
    method = _feature_method(FitNet, stages=1, weight=30.0, ce_weight=0.5, kd_weight=2.0, temperature=3.0)
    losses, _ = method.training_step(IMAGE_BATCH)
    (_, (guided, _)), (_, (hint, _)) = _stages(method.student, IMAGES), _stages(method.teacher, IMAGES)
    s, t = method.student(IMAGES), method.teacher(IMAGES)
    _close(losses["ce"], 0.5 * _ce(s, IMAGE_BATCH["label"]))
    _close(losses["kd"], 2.0 * 9.0 * _kl(t, s, 3.0))
    _close(losses["hint"], 30.0 * (((_conv1x1(method.regressor[0], guided) * BN_EVAL).relu() - hint) ** 2).mean())


def _attention(a, p):
    return _unit_rows(a.abs().pow(p).sum(1))


def test_at_is_weight_times_mean_squared_attention_difference_summed_over_stages():
    """Zagoruyko & Komodakis ICLR 2017, eq. 2 as the authors' code: weight * sum_j mean((Q_S/||Q_S|| -
    Q_T/||Q_T||)^2), Q = sum_c |A_c|^p; the larger map average-pooled to the smaller."""
    method = AT(TwoStage(2, 3), TwoStage(3, 4), weight=250.0, p=3.0)
    s = [_randn(3, 2, 4, 4, seed=31), _randn(3, 3, 4, 4, seed=32)]
    t = [_randn(3, 3, 4, 4, seed=33), _randn(3, 5, 2, 2, seed=34)]
    losses = method.distill(s, t, IMAGE_BATCH)
    pairs = [(s[0], t[0]), (_pool(s[1], 2), t[1])]
    _close(losses["at"], 250.0 * sum(((_attention(a, 3) - _attention(b, 3)) ** 2).mean() for a, b in pairs))


def test_feature_methods_sum_weighted_ce_kd_and_the_feature_term_over_hooked_stages():
    """The CRD benchmark's composition (feature.py): ce_weight CE + kd_weight T^2 KL(p_t || p_s) + the
    method's term, here AT on the stage outputs of the student and the teacher."""
    method = _feature_method(AT, weight=100.0, ce_weight=0.5, kd_weight=2.0, temperature=3.0)
    losses, _ = method.training_step(IMAGE_BATCH)
    (_, s_feats), (_, t_feats) = _stages(method.student, IMAGES), _stages(method.teacher, IMAGES)
    s, t = method.student(IMAGES), method.teacher(IMAGES)
    _close(losses["ce"], 0.5 * _ce(s, IMAGE_BATCH["label"]))
    _close(losses["kd"], 2.0 * 9.0 * _kl(t, s, 3.0))
    _close(losses["at"], 100.0 * sum(((_attention(a, 2) - _attention(b, 2)) ** 2).mean()
                                     for a, b in zip(s_feats, t_feats)))


def test_sp_is_weight_times_squared_frobenius_gram_difference_over_b_squared():
    """Tung & Mori ICCV 2019, eq. 2-4: weight * ||G_S - G_T||_F^2 / b^2, G = Q Q^T with L2-normalised rows."""
    method = SP(TwoStage(2, 3), TwoStage(3, 4), weight=30.0)
    s, t = _randn(3, 2, 2, 2, seed=41), _randn(3, 4, 2, 2, seed=42)

    def gram(x):
        q = x.flatten(1)
        g = q @ q.T
        return g / (g ** 2).sum(1, keepdim=True).sqrt()

    _close(method.distill([s], [t], IMAGE_BATCH)["sp"], 30.0 * ((gram(s) - gram(t)) ** 2).sum() / 9)


def _huber(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def test_rkd_weights_distance_and_angle_huber_terms_separately():
    """Park et al. CVPR 2019, eq. 2-5: weight * lambda_D * Huber(psi_D) over pairs, psi_D = ||x_i - x_j|| / mu,
    and weight * lambda_A * Huber(psi_A) over triplets, psi_A = cos of the angle at x_j."""
    method = RKD(TwoStage(2, 3), TwoStage(3, 4), distance_weight=25.0, angle_weight=50.0, weight=0.5)
    s, t = _randn(4, 3, seed=51), _randn(4, 5, seed=52) * 3
    pairs = list(itertools.combinations(range(4), 2))
    triplets = list(itertools.permutations(range(4), 3))

    def distances(x):
        d = torch.stack([(x[i] - x[j]).norm() for i, j in pairs])
        return d / d.mean()

    def angles(x):
        def unit(v):
            return v / v.norm()
        return torch.stack([unit(x[i] - x[j]) @ unit(x[k] - x[j]) for i, j, k in triplets])

    losses = method.distill([s], [t], IMAGE_BATCH)
    _close(losses["rkd_d"], 0.5 * 25.0 * _huber(distances(s), distances(t)))
    _close(losses["rkd_a"], 0.5 * 50.0 * _huber(angles(s), angles(t)))


def test_pkt_is_weight_times_kl_of_teacher_to_student_conditionals_over_b_squared():
    """Passalis & Tefas ECCV 2018 with the benchmark's normalisation: weight * sum_i sum_{j != i}
    p^t_{j|i} log(p^t_{j|i} / p^s_{j|i}) / B^2, p_{j|i} = K_ij / sum_{k != i} K_ik, K = (cos + 1) / 2."""
    method = PKT(TwoStage(2, 3), TwoStage(3, 4), weight=300.0)
    s, t = _randn(4, 3, seed=61), _randn(4, 5, seed=62)

    def conditional(x):
        u = _unit_rows(x)
        k = (u @ u.T + 1) / 2 * (1 - torch.eye(4, dtype=DT))
        return k / k.sum(1, keepdim=True)

    p_s, p_t = conditional(s), conditional(t)
    off = ~torch.eye(4, dtype=torch.bool)
    kl = (p_t[off] * (p_t[off] / p_s[off]).log()).sum()
    _close(method.distill([s], [t], IMAGE_BATCH)["pkt"], 300.0 * kl / 16, rtol=1e-5)


def test_cc_is_weight_times_mean_squared_taylor_rbf_correlation_difference():
    """Peng et al. ICCV 2019: weight * mean_ij (C^S_ij - C^T_ij)^2, C_ij = sum_{p<=P} exp(-2 gamma)
    (2 gamma)^p / p! (e_i . e_j)^p on the L2-normalised Linear embeddings e."""
    method = CC(TwoStage(2, 3), TwoStage(3, 4), weight=2.0, gamma=0.6, order=3, feat_dim=3)
    s, t = _randn(4, 5, seed=71), _randn(4, 6, seed=72)
    method.build([s], [t])
    method.double()

    def correlation(x, embed):
        e = _unit_rows(_apply(embed, x))
        m = e @ e.T
        return sum(math.exp(-1.2) * 1.2 ** p / math.factorial(p) * m ** p for p in range(4))

    expected = 2.0 * ((correlation(s, method.embed_s) - correlation(t, method.embed_t)) ** 2).mean()
    _close(method.distill([s], [t], IMAGE_BATCH)["cc"], expected)


def test_vid_is_weight_times_mean_gaussian_nll_with_softplus_variance_starting_at_init_var():
    """Ahn et al. CVPR 2019, eq. 2-4: weight * sum_k mean(log sigma_c + (t - mu(s))^2 / (2 sigma_c^2)),
    sigma_c^2 = softplus(alpha_c) + eps = init_var at the start, mu three 1x1 convs with ReLUs between."""
    method = VID(TwoStage(2, 3), TwoStage(3, 4), weight=1.5, init_var=3.0)
    s = [_randn(3, 2, 4, 4, seed=81), _randn(3, 3, 2, 2, seed=82)]
    t = [_randn(3, 3, 2, 2, seed=83), _randn(3, 4, 2, 2, seed=84)]
    method.build(s, t)
    method.double()
    total = 0.0
    for x, target, mean in zip([_pool(s[0], 2), s[1]], t, method.means):
        mu = _conv1x1(mean[4], _conv1x1(mean[2], _conv1x1(mean[0], x).relu()).relu())
        total = total + (0.5 * math.log(3.0) + (target - mu) ** 2 / 6.0).mean()
    _close(method.distill(s, t, IMAGE_BATCH)["vid"], 1.5 * total, rtol=1e-6)


def test_nst_is_weight_times_polynomial_kernel_mmd_of_normalised_channel_maps():
    """Huang & Wang 2017, eq. 6-8: weight * sum_stages batch-mean [mean k(f_t, f_t') + mean k(f_s, f_s')
    - 2 mean k(f_t, f_s)], k(x, y) = (x . y)^2, f a channel's L2-normalised map; larger maps pooled."""
    method = NST(TwoStage(2, 3), TwoStage(3, 4), weight=20.0)
    s = [_randn(3, 2, 4, 4, seed=91), _randn(3, 3, 2, 2, seed=92)]
    t = [_randn(3, 3, 2, 2, seed=93), _randn(3, 4, 2, 2, seed=94)]

    def mmd(a, b):
        total = 0.0
        for fa, fb in zip(a, b):
            fa, fb = _unit_rows(fa), _unit_rows(fb)
            total = total + ((fb @ fb.T) ** 2).mean() + ((fa @ fa.T) ** 2).mean() - 2 * ((fb @ fa.T) ** 2).mean()
        return total / len(a)

    _close(method.distill(s, t, IMAGE_BATCH)["nst"], 20.0 * (mmd(_pool(s[0], 2), t[0]) + mmd(s[1], t[1])))


def test_kdsvd_compares_rbf_correlations_of_aligned_singular_vectors_between_consecutive_stages():
    """Lee, Kim & Song ECCV 2018 (authors' code): per sample, top-k right singular vectors of the (HW, C) map
    (the student's k + 3, each teacher vector matched by the student's of largest |cos|, sign-aligned), both
    scaled by the teacher's L2-normalised singular values; G[c, c', i] = exp(-(v_l[c,i] - v_{l-1}[c',i])^2 / 8);
    weight * sum_l sum (G_S - G_T)^2 / B."""
    method = KDSVD(TwoStage(2, 3), TwoStage(3, 4), k=2, weight=1.5)
    s = [_randn(2, 6, 3, 3, seed=101), _randn(2, 5, 3, 3, seed=102)]
    t = [_randn(2, 6, 3, 3, seed=103), _randn(2, 5, 3, 3, seed=104)]
    method.build(s, t)

    def vectors(map_s, map_t):
        _, sv_t, vh_t = torch.linalg.svd(map_t.reshape(map_t.shape[0], -1).T, full_matrices=False)
        _, _, vh_s = torch.linalg.svd(map_s.reshape(map_s.shape[0], -1).T, full_matrices=False)
        scale = sv_t[:2] / sv_t[:2].norm()
        teacher = torch.stack([vh_t[i] * scale[i] for i in range(2)], 1)
        student = []
        for i in range(2):
            cos = torch.stack([vh_s[j] @ vh_t[i] for j in range(5)])
            j = int(cos.abs().argmax())
            student.append(torch.sign(cos[j]) * vh_s[j] * scale[i])
        return torch.stack(student, 1), teacher

    def rbf(a, b):
        return torch.exp(-(a[:, None, :] - b[None, :, :]) ** 2 / 8)

    total = 0.0
    for b in range(2):
        (s1, t1), (s2, t2) = vectors(s[0][b], t[0][b]), vectors(s[1][b], t[1][b])
        total = total + ((rbf(s2, s1) - rbf(t2, t1)) ** 2).sum()
    _close(method.distill(s, t, IMAGE_BATCH)["kdsvd"], 1.5 * total / 2)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ft_reconstructs_the_teacher_then_matches_normalised_factors_elementwise(p):
    """Kim et al. NeurIPS 2018: paraphraser stage MSE(P(t), t) alone; then ce_weight CE + weight *
    mean |F_S/||F_S|| - F_T/||F_T|| |^p, F_T the paraphraser's encoder output, F_S the translator's."""
    method = _feature_method(FT, init_epochs=1, p=p, weight=20.0, ce_weight=0.5)
    paraphraser, train = method.stages(3)
    (_, (_, s_map)), (_, (_, t_map)) = _stages(method.student, IMAGES), _stages(method.teacher, IMAGES)
    method.on_stage_start(paraphraser, None)
    method.eval()
    losses, _ = method.training_step(IMAGE_BATCH)
    assert set(losses) == {"reconstruction"}
    _close(losses["reconstruction"], ((method.paraphraser(t_map) - t_map) ** 2).mean())
    method.on_stage_start(train, None)
    losses, _ = method.training_step(IMAGE_BATCH)
    factor_s, factor_t = method.translator(s_map), method.paraphraser.encoder(t_map)
    diff = _unit_rows(factor_s) - _unit_rows(factor_t)
    _close(losses["ce"], 0.5 * _ce(method.student(IMAGES), IMAGE_BATCH["label"]))
    _close(losses["ft"], 20.0 * diff.abs().pow(p).mean())


def test_ab_weights_deeper_stages_by_two_to_the_l_minus_n_plus_one():
    """Heo et al. AAAI 2019, eq. 5 with the benchmark's weights: weight * sum_l 2^(l - n + 1) batch-mean
    sum over neurons of (1[t > 0] relu(mu - r(s)) + 1[t <= 0] relu(mu + r(s)))^2, r a 1x1 conv + BN."""
    method = _feature_method(AB, init_epochs=1, margin=0.5, weight=0.01)
    s = [_randn(3, 2, 4, 4, seed=111), _randn(3, 3, 2, 2, seed=112)]
    t = [_randn(3, 3, 4, 4, seed=113), _randn(3, 4, 2, 2, seed=114)]
    total = 0.0
    for level, (x, target, conn) in enumerate(zip(s, t, method.connectors)):
        r = _conv1x1(conn[0], x) * BN_EVAL
        on = (target > 0).double()
        per = (on * (0.5 - r).relu() + (1 - on) * (0.5 + r).relu()) ** 2
        total = total + 2.0 ** (level - 1) * per.flatten(1).sum(1).mean()
    _close(method.distill(s, t, IMAGE_BATCH)["ab"], 0.01 * total)


def test_fsp_is_weight_times_mean_squared_flow_matrix_difference_summed_over_pairs():
    """Yim et al. CVPR 2017, eq. 1-2 with the benchmark's mean: weight * sum_i mean (G_S^i - G_T^i)^2,
    G = sum_hw F1 F2^T / (h w) between consecutive positions (input, stage 1, stage 2), larger map pooled."""
    method = _feature_method(FSP, s_widths=(3, 4), t_widths=(3, 4), init_epochs=1, weight=2.0)
    shapes = [(3, 1, 4, 4), (3, 3, 4, 4), (3, 4, 2, 2)]
    s = [_randn(*shape, seed=121 + i) for i, shape in enumerate(shapes)]
    t = [_randn(*shape, seed=131 + i) for i, shape in enumerate(shapes)]

    def flows(f):
        pairs = [(f[0], f[1]), (_pool(f[1], 2), f[2])]
        return [torch.einsum("bihw,bjhw->bij", a, b) / (a.shape[2] * a.shape[3]) for a, b in pairs]

    expected = 2.0 * sum(((g_s - g_t) ** 2).mean() for g_s, g_t in zip(flows(s), flows(t)))
    _close(method.distill(s, t, IMAGE_BATCH)["fsp"], expected)


@pytest.mark.parametrize("cls, name, kwargs", [
    (AB, "ab", {"s_widths": (2, 3), "t_widths": (3, 4)}),
    (FSP, "fsp", {"s_widths": (3, 4), "t_widths": (3, 4)}),
])
def test_feature_only_first_stage_then_the_task_is_weighted_ce_and_kd(cls, name, kwargs):
    """AB and FSP: the init stage trains the feature term alone; the task stage is ce_weight CE
    + kd_weight T^2 KL(p_t || p_s) without features."""
    method = _feature_method(cls, init_epochs=1, ce_weight=0.5, kd_weight=2.0, temperature=3.0, **kwargs)
    init, task = method.stages(2)
    method.on_stage_start(init, None)
    assert set(method.training_step(IMAGE_BATCH)[0]) == {name}
    method.on_stage_start(task, None)
    losses, _ = method.training_step(IMAGE_BATCH)
    s, t = method.student(IMAGES), method.teacher(IMAGES)
    assert set(losses) == {"ce", "kd"}
    _close(losses["ce"], 0.5 * _ce(s, IMAGE_BATCH["label"]))
    _close(losses["kd"], 2.0 * 9.0 * _kl(t, s, 3.0))


def test_crd_is_weight_times_symmetric_nce_with_z_from_the_first_batch_and_momentum_banks():
    """Tian et al. ICLR 2020, eq. 18: weight * (NCE(S vs teacher bank) + NCE(T vs student bank)),
    P = exp(v . m / tau) / Z, Z = M mean P on the first batch, NCE = -(log h(pos) + sum log(1 - h(neg))),
    h = P / (P + N/M); banks updated to normalise(m old + (1 - m) new) after scoring."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    data = SimpleNamespace(name="fake", in_chans=1, image_size=4, splits=SimpleNamespace(train=SimpleNamespace(
        labels=labels)))
    torch.manual_seed(0)
    method = CRD(TwoStage(2, 3), TwoStage(3, 4), weight=0.8, feat_dim=3, nce_k=4, nce_t=0.1, nce_m=0.3)
    method.setup(data)
    with torch.no_grad():
        method.memory_s.copy_(_unit_rows(_randn(8, 3, seed=141)).float())
        method.memory_t.copy_(_unit_rows(_randn(8, 3, seed=142)).float())
    negatives = torch.tensor([[2, 3, 4, 7], [0, 1, 4, 5], [0, 2, 6, 7]])
    method.negatives = lambda index: negatives
    s, t = _randn(3, 3, seed=143).float(), _randn(3, 4, seed=144).float()
    bank_s, bank_t = method.memory_s.double().clone(), method.memory_t.double().clone()
    losses = method.distill([s], [t], IMAGE_BATCH)

    index = IMAGE_BATCH["index"]
    idx = torch.cat([index[:, None], negatives], 1)
    v_s = _unit_rows(_apply(method.embed_s, s).double())
    v_t = _unit_rows(_apply(method.embed_t, t).double())
    out_s = torch.exp(torch.einsum("bkd,bd->bk", bank_t[idx], v_s) / 0.1)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", bank_s[idx], v_t) / 0.1)
    z_s, z_t = 8 * out_s.mean(), 8 * out_t.mean()
    noise = 4 / 8

    def nce(p):
        return -((p[:, 0] / (p[:, 0] + noise)).log() + (noise / (p[:, 1:] + noise)).log().sum(1)).mean()

    _close(losses["crd"], 0.8 * (nce(out_s / z_s) + nce(out_t / z_t)), rtol=1e-5)
    _close(method.z, torch.stack([z_s, z_t]), rtol=1e-5)
    _close(method.memory_s[index], _unit_rows(0.3 * bank_s[index] + 0.7 * v_s), rtol=1e-5)
    _close(method.memory_t[index], _unit_rows(0.3 * bank_t[index] + 0.7 * v_t), rtol=1e-5)
    method.distill([s * 2], [t * 3], IMAGE_BATCH)
    _close(method.z, torch.stack([z_s, z_t]), rtol=1e-5)


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_ofd_is_weighted_partial_l2_to_the_margin_relu_halving_per_shallower_stage():
    """Heo et al. ICCV 2019, eq. 5-6: weight * sum_i d_p(max(T_i, m), r(S_i)) / 2^(n - i - 1) / B, d_p the
    squared difference except where r(S) <= target <= 0; m = E[x | x < 0] of N(mean, std^2) per channel,
    measured on the first batch; r a 1x1 conv + BN."""
    method = _feature_method(OFD, weight=0.01)
    s = [_randn(3, 2, 4, 4, seed=151), _randn(3, 3, 2, 2, seed=152)]
    t = [_randn(3, 3, 4, 4, seed=153) - 0.3, _randn(3, 4, 2, 2, seed=154) * 2 + 0.5]
    losses = method.distill(s, t, IMAGE_BATCH)
    total = 0.0
    for i, (x, target, conn) in enumerate(zip(s, t, method.connectors)):
        values = target.transpose(0, 1).flatten(1)
        mean, std = values.mean(1), values.std(1)
        a = mean / std
        margin = mean - std * torch.exp(-a ** 2 / 2) / math.sqrt(2 * math.pi) / _normal_cdf(-a)
        _close(getattr(method, f"margin_{i}"), margin, rtol=1e-5)
        goal = torch.maximum(target, margin.view(1, -1, 1, 1))
        r = _conv1x1(conn[0], x) * BN_EVAL
        sq = torch.where((r <= goal) & (goal <= 0), torch.zeros_like(r), (goal - r) ** 2)
        total = total + sq.sum() / 3 / 2 ** (1 - i)
    _close(losses["ofd"], 0.01 * total, rtol=1e-5)


@pytest.mark.parametrize("epoch, ramp", [(0, 0.1), (4, 0.5), (9, 1.0), (30, 1.0)])
def test_reviewkd_ramps_the_weighted_hierarchical_context_loss_by_epoch_plus_one_over_warmup(epoch, ramp):
    """Chen et al. CVPR 2021 with mdistiller's warm-up: ce_weight CE + weight min((epoch + 1) / warmup, 1)
    sum_levels HCL, HCL = (MSE + sum_l w_l MSE(pool_l)) / (1 + sum_l w_l), levels 4, 2, 1 below the map's
    size with w = 1/2, 1/4, 1/8; the levels are the teacher's pre-ReLU stages and its pooled last output."""
    method = _feature_method(ReviewKD, weight=1.5, warmup_epochs=10, ce_weight=0.5)
    offsets = []
    with torch.no_grad():
        for i, abf in enumerate(method.abfs):
            abf.conv2[0].weight.zero_()
            offsets.append(_randn(abf.conv2[1].bias.shape[0], seed=161 + i))
            abf.conv2[1].bias.copy_(offsets[-1])
    loop = _Loop(epoch)
    losses, _ = method.step(IMAGE_BATCH, loop)
    (pre1, pre2), (_, post2) = _stages(method.teacher, IMAGES)
    levels = [pre1, pre2, post2.mean((2, 3), keepdim=True)]
    out = [b.view(1, -1, 1, 1).expand_as(level) for b, level in zip(offsets, levels)]

    def mse(a, b):
        return ((a - b) ** 2).mean()

    hcl = ((mse(out[0], levels[0]) + mse(out[0][:, :, :2, :2], _pool(levels[0], 2)) / 2
            + mse(out[0][:, :, :1, :1], _pool(levels[0], 1)) / 4) / 1.75
           + (mse(out[1], levels[1]) + mse(out[1][:, :, :1, :1], _pool(levels[1], 1)) / 2) / 1.5
           + mse(out[2], levels[2]))
    assert set(losses) == {"ce", "reviewkd"}
    _close(losses["ce"], 0.5 * _ce(method.student(IMAGES), IMAGE_BATCH["label"]))
    _close(losses["reviewkd"], 1.5 * ramp * hcl)
    _close(loop.optimized[0], losses["ce"] + losses["reviewkd"])


@pytest.mark.parametrize("student, teacher, size, mid", [("cnn_small", "cnn", 28, 48),
                                                         ("resnet8x4", "resnet32x4", 32, 256)])
def test_reviewkd_fuses_at_the_width_of_the_students_last_stage(student, teacher, size, mid):
    """mdistiller's middle width min(512, in_channels[-1]) is its pooled feature's, which always has the last stage's
    channels; kdrun's cnn flattens a 3x3 map into its classifier (9x as wide: 432 for cnn_small, whose fusion
    convolutions at 28x28 then cost 40 KD steps), so the width is read from the last stage."""
    from kdrun import models

    kwargs = {"width": 12} if student == "cnn_small" else {}
    method = ReviewKD(models.create("cnn" if student == "cnn_small" else student, 10, in_chans=1, **kwargs),
                      models.create(teacher, 10, in_chans=1))
    method.setup(SimpleNamespace(in_chans=1, image_size=size))
    assert {abf.conv1[0].out_channels for abf in method.abfs} == {mid}


# ---------------------------------------------------------------------------------------------- self-training


UNLABELED = _randn(5, 3, seed=7) * torch.tensor([[0.2], [1.0], [0.5], [2.0], [0.1]], dtype=DT)


@pytest.mark.parametrize("hard", [True, False])
def test_pseudo_label_term_is_lambda_times_kept_weighted_ce_normalised_over_the_unlabeled_set(hard):
    """Lee 2013, teacher-student form: CE(y, S(x)) + lambda mean_i[w_i CE(t_i, S(u_i))] / mean_j[w_j], t the
    teacher's one-hot argmax (hard) or softmax, w_i = 1[max t_i >= threshold], j over the whole unlabeled set."""
    student, teacher = _linear(3, 4, seed=5), _linear(3, 4, seed=3)
    method = PseudoLabel(student, teacher, hard=hard, threshold=0.65, unlabeled_weight=2.0)
    unlabeled = [{"image": UNLABELED[:3], "label": torch.tensor([0, 1, 2])},
                 {"image": UNLABELED[3:], "label": torch.tensor([1, 3])}]
    method.make_labels(_Loop(unlabeled=unlabeled))
    probs = torch.softmax(_apply(teacher, UNLABELED), 1)
    kept = (probs.max(1).values >= 0.65).double()
    assert 0 < kept.sum() < len(kept)
    targets = nn.functional.one_hot(probs.argmax(1), 4).double() if hard else probs
    index = torch.tensor([3, 1, 4])
    batch = {**BATCH, "unlabeled_image": UNLABELED[index], "unlabeled_index": index}
    losses, _ = method.training_step(batch)
    per_image = -(targets[index] * _log_p(_apply(student, UNLABELED[index]))).sum(1)
    _close(losses["ce"], _ce(_apply(student, X), Y))
    _close(losses["pseudo"], 2.0 * (kept[index] / kept.mean() * per_image).mean(), rtol=1e-6)


NOISY_PROBS = torch.tensor([
    [0.10, 0.50, 0.20, 0.20],
    [0.70, 0.10, 0.10, 0.10],
    [0.28, 0.26, 0.24, 0.22],
    [0.90, 0.05, 0.03, 0.02],
    [0.20, 0.10, 0.55, 0.15],
    [0.60, 0.20, 0.10, 0.10],
    [0.80, 0.10, 0.05, 0.05],
    [0.25, 0.10, 0.45, 0.20],
])


@pytest.mark.parametrize("balance, per_class, expected", [
    (False, None, [1, 1, 0, 1, 1, 1, 1, 1]),
    (True, 3, [3, 1, 0, 1, 1.5, 0, 1, 1.5]),
    (True, None, [2, 0, 0, 1, 1, 0, 1, 1]),
])
def test_noisy_student_filters_by_confidence_then_balances_to_k_per_class(balance, per_class, expected):
    """Xie et al. CVPR 2020, Sec. 3: drop max p < threshold; a class predicted more than K times keeps its K most
    confident, one with n_c < K images is duplicated up to K (weight K / n_c); K = per_class, or the mean kept
    per class (7 kept, 4 classes: 2)."""
    method = NoisyStudent(_linear(3, 4, seed=5), _linear(3, 4, seed=3), threshold=0.3, balance=balance,
                          per_class=per_class)
    assert method.select(NOISY_PROBS.clone()).tolist() == expected


def test_data_distillation_predicts_the_mean_softmax_over_zooms_and_flips():
    """Radosavovic et al. CVPR 2018: the mean of softmax(T(g(x))) over the transforms g: each scale with and
    without a horizontal flip; a 2x zoom of a 4x4 image samples rows and columns at 0.75, 1.25, 1.75, 2.25."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(DT)
    method = DataDistillation(model, model, scales=[1.0, 2.0], flip=True)
    images = _randn(2, 1, 4, 4, seed=171)
    a = torch.tensor([[0.25, 0.75, 0, 0], [0, 0.75, 0.25, 0], [0, 0.25, 0.75, 0], [0, 0, 0.75, 0.25]], dtype=DT)
    zoomed = a @ images @ a.T
    views = [images, images[..., [3, 2, 1, 0]], zoomed, zoomed[..., [3, 2, 1, 0]]]
    layer = model[1]
    expected = torch.stack([torch.softmax(v.flatten(1) @ layer.weight.T + layer.bias, 1) for v in views]).mean(0)
    _close(method.predict(model, images), expected, rtol=1e-6)
