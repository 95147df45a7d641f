"""Tests of the pure loss functions in kdrun.losses.

Every expected value is recomputed here independently, with plain Python loops
over `tolist()` values (or numpy), never by calling the code under test.
Inputs are float64 so that the comparisons can be tight.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from kdrun.losses import (
    ab_loss,
    at_loss,
    attention_map,
    cc_loss,
    crd_nce_loss,
    dist_loss,
    dkd_loss,
    ensemble_kd_loss,
    fsp_loss,
    fsp_matrix,
    ft_loss,
    hcl_loss,
    hint_loss,
    kd_loss,
    kdsvd_loss,
    nst_loss,
    ofd_loss,
    ofd_margin,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    sp_loss,
    standardize,
    tckd_nckd,
    vid_loss,
)

DT = torch.float64


def tensor(x):
    return torch.tensor(x, dtype=DT)


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def close(actual, expected, tol=1e-9):
    assert isinstance(actual, torch.Tensor)
    actual = actual.detach()
    assert actual.dim() == 0, f"expected a scalar, got shape {tuple(actual.shape)}"
    assert math.isfinite(float(actual))
    assert float(actual) == pytest.approx(expected, rel=tol, abs=tol), (float(actual), expected)


# ----------------------------------------------------------------- plain-Python helpers


def softmax(row, temperature=1.0):
    m = max(row)
    e = [math.exp((v - m) / temperature) for v in row]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


def unit(a):
    n = norm(a)
    return [x / n for x in a]


def sub(a, b):
    return [x - y for x, y in zip(a, b)]


def flat(x):
    """Nested list of one sample -> flat list."""
    if isinstance(x, list):
        return [v for item in x for v in flat(item)]
    return [x]


def huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [x - ma for x in a], [y - mb for y in b]
    return dot(ca, cb) / math.sqrt(dot(ca, ca) * dot(cb, cb))


# ----------------------------------------------------------------- kd_loss

ZS = [[1.0, 2.0, 0.5, -1.0], [0.0, -2.0, 3.0, 1.0], [2.5, 2.5, -0.5, 0.0]]
ZT = [[2.0, 1.0, 0.0, -3.0], [1.0, 0.5, 2.0, -1.0], [0.0, 4.0, 1.0, 1.0]]
LABELS = [0, 2, 1]


def hand_kd(zs, zt, temperature):
    per = [kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(zs, zt)]
    return sum(per) / len(per) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_hand(temperature):
    close(kd_loss(tensor(ZS), tensor(ZT), temperature), hand_kd(ZS, ZT, temperature))


def test_kd_loss_zero_when_equal():
    close(kd_loss(tensor(ZS), tensor(ZS), 4.0), 0.0)


# ----------------------------------------------------------------- standardize


def test_standardize_hand():
    out = standardize(tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 8.0]]))
    # row 1: mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    s1 = math.sqrt(1.25)
    # row 2: mean 3.5, population variance (3 * 2.25 + 20.25) / 4 = 6.75
    s2 = math.sqrt(6.75)
    expected = [[-1.5 / s1, -0.5 / s1, 0.5 / s1, 1.5 / s1], [-1.5 / s2, -1.5 / s2, -1.5 / s2, 4.5 / s2]]
    assert torch.allclose(out, tensor(expected), atol=1e-6)


def test_standardize_mean_zero_std_one_and_invariance():
    z = randn(5, 10, seed=1) * 3 + 7
    out = standardize(z)
    assert out.shape == z.shape
    assert torch.allclose(out.mean(dim=1), torch.zeros(5, dtype=DT), atol=1e-9)
    assert torch.allclose(out.std(dim=1, correction=0), torch.ones(5, dtype=DT), atol=1e-6)
    # the paper's point: the standardised logits ignore a per-sample shift and positive scale
    shifted = 0.25 * z + randn(5, 1, seed=2)
    assert torch.allclose(standardize(shifted), out, atol=1e-5)


def test_standardize_constant_row_is_finite():
    out = standardize(tensor([[3.0, 3.0, 3.0]]))
    assert torch.equal(out, torch.zeros(1, 3, dtype=DT))


# ----------------------------------------------------------------- DKD


def hand_tckd_nckd(zs, zt, labels, temperature):
    tckd = nckd = 0.0
    for s, t, y in zip(zs, zt, labels):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        hat_s = [p / (1 - ps[y]) for k, p in enumerate(ps) if k != y]
        hat_t = [p / (1 - pt[y]) for k, p in enumerate(pt) if k != y]
        nckd += kl(hat_t, hat_s)
    n = len(labels)
    return tckd / n * temperature**2, nckd / n * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_tckd_nckd_and_dkd_hand(temperature):
    tckd, nckd = tckd_nckd(tensor(ZS), tensor(ZT), torch.tensor(LABELS), temperature)
    e_tckd, e_nckd = hand_tckd_nckd(ZS, ZT, LABELS, temperature)
    close(tckd, e_tckd)
    close(nckd, e_nckd)
    loss = dkd_loss(tensor(ZS), tensor(ZT), torch.tensor(LABELS), alpha=1.5, beta=8.0, temperature=temperature)
    close(loss, 1.5 * e_tckd + 8.0 * e_nckd)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_reformulation_identity(temperature):
    """DKD paper, Sec. 3.1: KD = TCKD + (1 - p^T_target) * NCKD, per sample."""
    for s, t, y in zip(ZS, ZT, LABELS):
        zs, zt, lab = tensor([s]), tensor([t]), torch.tensor([y])
        tckd, nckd = tckd_nckd(zs, zt, lab, temperature)
        p_target = softmax(t, temperature)[y]
        close(kd_loss(zs, zt, temperature), float(tckd + (1 - p_target) * nckd))
        close(dkd_loss(zs, zt, lab, 1.0, 1 - p_target, temperature), float(kd_loss(zs, zt, temperature)))


def test_dkd_zero_when_equal_and_finite_for_large_logits():
    close(dkd_loss(tensor(ZS), tensor(ZS), torch.tensor(LABELS), 1.0, 8.0, 4.0), 0.0)
    big_s = tensor([[80.0, -60.0, 10.0], [-50.0, 90.0, 0.0]])
    big_t = tensor([[-70.0, 40.0, 95.0], [30.0, -20.0, 85.0]])
    loss = dkd_loss(big_s, big_t, torch.tensor([0, 1]), 1.0, 8.0, 1.0)
    assert math.isfinite(float(loss)) and float(loss) > 0


# ----------------------------------------------------------------- DIST


def hand_dist(zs, zt, beta, gamma, temperature):
    ys = [softmax(r, temperature) for r in zs]
    yt = [softmax(r, temperature) for r in zt]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(pearson([r[j] for r in ys], [r[j] for r in yt]) for j in cols) / len(cols)
    return (beta * inter + gamma * intra) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_hand(temperature):
    close(dist_loss(tensor(ZS), tensor(ZT), 2.0, 0.5, temperature), hand_dist(ZS, ZT, 2.0, 0.5, temperature), 1e-6)
    # each relation on its own
    close(dist_loss(tensor(ZS), tensor(ZT), 1.0, 0.0, temperature), hand_dist(ZS, ZT, 1.0, 0.0, temperature), 1e-6)
    close(dist_loss(tensor(ZS), tensor(ZT), 0.0, 1.0, temperature), hand_dist(ZS, ZT, 0.0, 1.0, temperature), 1e-6)


def test_dist_zero_when_equal_and_bounded():
    close(dist_loss(tensor(ZS), tensor(ZS), 1.0, 1.0, 4.0), 0.0)
    # Pearson in [-1, 1]: each relation term lies in [0, 2] T^2
    loss = dist_loss(randn(6, 5, seed=3), randn(6, 5, seed=4), 1.0, 0.0, 1.0)
    assert 0.0 <= float(loss) <= 2.0


# ----------------------------------------------------------------- FitNets


def test_hint_loss_hand_is_mse():
    s = [[[[1.0, 2.0]], [[0.0, -1.0]]]]  # (1, 2, 1, 2)
    t = [[[[0.5, 4.0]], [[1.0, -1.0]]]]
    expected = (0.25 + 4.0 + 1.0 + 0.0) / 4
    close(hint_loss(tensor(s), tensor(t)), expected)
    close(hint_loss(tensor([[1.0, 2.0], [3.0, 5.0]]), tensor([[0.0, 0.0], [3.0, 4.0]])), (1 + 4 + 0 + 1) / 4)


def test_hint_loss_zero_and_shape_check():
    x = randn(2, 3, 4, 4)
    close(hint_loss(x, x.clone()), 0.0)
    with pytest.raises(ValueError):
        hint_loss(randn(2, 3, 4, 4), randn(2, 5, 4, 4))


# ----------------------------------------------------------------- AT


def hand_attention(sample, p):
    """sample: C x H x W nested list -> normalised flat map."""
    c, h, w = len(sample), len(sample[0]), len(sample[0][0])
    q = [sum(abs(sample[k][i][j]) ** p for k in range(c)) for i in range(h) for j in range(w)]
    return unit(q)


S_MAP = [
    [[[1.0, -2.0], [0.0, 3.0]], [[2.0, 1.0], [-1.0, 0.5]]],
    [[[0.5, 0.5], [1.0, -1.0]], [[0.0, 2.0], [2.0, 1.0]]],
]  # (2, 2, 2, 2)
T_MAP = [
    [[[2.0, 0.0], [1.0, 1.0]], [[0.0, -1.0], [3.0, 1.0]], [[1.0, 1.0], [1.0, 2.0]]],
    [[[1.0, 2.0], [0.0, 0.0]], [[-1.0, 0.5], [0.5, 4.0]], [[0.0, 0.0], [1.0, 1.0]]],
]  # (2, 3, 2, 2)


@pytest.mark.parametrize("p", [1, 2])
def test_attention_map_hand_and_unit_norm(p):
    out = attention_map(tensor(S_MAP), p)
    assert out.shape == (2, 4)
    assert torch.allclose(out, tensor([hand_attention(x, p) for x in S_MAP]))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, dtype=DT))


def test_at_loss_hand():
    per = [norm(sub(hand_attention(s, 2), hand_attention(t, 2))) for s, t in zip(S_MAP, T_MAP)]
    close(at_loss(tensor(S_MAP), tensor(T_MAP)), sum(per) / 2)


def test_at_loss_zero_scale_invariance_and_size_check():
    s, t = tensor(S_MAP), tensor(T_MAP)
    close(at_loss(s, s.clone()), 0.0)
    close(at_loss(3.0 * s, t), float(at_loss(s, t)))
    close(at_loss(s, 0.1 * t), float(at_loss(s, t)))
    with pytest.raises(ValueError):
        at_loss(randn(2, 3, 4, 4), randn(2, 3, 8, 8))


# ----------------------------------------------------------------- SP


def hand_sp(s_samples, t_samples):
    def gram(samples):
        q = [flat(x) for x in samples]
        g = [[dot(a, b) for b in q] for a in q]
        return [unit(row) for row in g]

    gs, gt = gram(s_samples), gram(t_samples)
    b = len(s_samples)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_loss_hand():
    s = randn(3, 2, 2, 2, seed=5)
    t = randn(3, 5, seed=6)  # shapes may differ, only the batch must match
    close(sp_loss(s, t), hand_sp(s.tolist(), t.tolist()))


def test_sp_loss_zero_and_scale_invariance():
    s, t = randn(4, 3, 2, 2, seed=7), randn(4, 6, 2, 2, seed=8)
    close(sp_loss(s, s.clone()), 0.0)
    base = float(sp_loss(s, t))
    assert base > 0
    close(sp_loss(5.0 * s, t), base)
    close(sp_loss(s, 0.2 * t), base)


# ----------------------------------------------------------------- RKD

# the far point is a different one for student and teacher, so some Huber arguments exceed 1
RKD_T = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 0.0]]
RKD_S = [[0.0, 0.0, 1.0], [100.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]


def hand_rkd_distance(s, t):
    pairs = list(itertools.combinations(range(len(s)), 2))

    def psi(x):
        d = [norm(sub(x[i], x[j])) for i, j in pairs]
        mu = sum(d) / len(d)
        return [v / mu for v in d]

    diffs = [a - b for a, b in zip(psi(s), psi(t))]
    assert any(abs(v) > 1 for v in diffs) and any(abs(v) < 1 for v in diffs)
    return sum(huber(v) for v in diffs) / len(diffs)


def hand_rkd_angle(s, t):
    def cos(x, i, j, k):
        a, b = sub(x[i], x[j]), sub(x[k], x[j])
        return dot(a, b) / (norm(a) * norm(b))

    triplets = list(itertools.permutations(range(len(s)), 3))
    vals = [huber(cos(s, i, j, k) - cos(t, i, j, k)) for i, j, k in triplets]
    return sum(vals) / len(vals)


def test_rkd_distance_hand():
    close(rkd_distance_loss(tensor(RKD_S), tensor(RKD_T)), hand_rkd_distance(RKD_S, RKD_T))


def test_rkd_angle_hand():
    close(rkd_angle_loss(tensor(RKD_S), tensor(RKD_T)), hand_rkd_angle(RKD_S, RKD_T))
    s, t = randn(5, 4, seed=9), randn(5, 3, seed=10)
    close(rkd_angle_loss(s, t), hand_rkd_angle(s.tolist(), t.tolist()))


@pytest.mark.parametrize("fn", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_zero_and_similarity_invariance(fn):
    s, t = randn(6, 4, seed=11), randn(6, 7, seed=12)
    close(fn(s, s.clone()), 0.0)
    base = float(fn(s, t))
    assert base > 0
    close(fn(7.0 * s, t), base)  # scale of the embedding does not matter
    close(fn(s, 0.3 * t + 2.0), base)  # nor a translation
    with pytest.raises(ValueError):
        fn(s[:1], t[:1])


# ----------------------------------------------------------------- PKT


def hand_pkt(s, t):
    def cond(x):
        b = len(x)
        k = [[(dot(x[i], x[j]) / (norm(x[i]) * norm(x[j])) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[i][m] for m in range(b) if m != i) for j in range(b)] for i in range(b)]

    ps, pt = cond(s), cond(t)
    b = len(s)
    return sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(b) for j in range(b) if i != j) / b


def test_pkt_hand():
    s, t = randn(4, 3, seed=13), randn(4, 5, seed=14)
    close(pkt_loss(s, t), hand_pkt(s.tolist(), t.tolist()), 1e-5)


def test_pkt_zero_and_scale_invariance():
    s, t = randn(5, 6, seed=15), randn(5, 2, 2, seed=16)
    close(pkt_loss(s, s.clone()), 0.0)
    base = float(pkt_loss(s, t))
    assert base > 0
    close(pkt_loss(10.0 * s, t), base, 1e-6)
    close(pkt_loss(s, 0.5 * t), base, 1e-6)


# ----------------------------------------------------------------- CC


def hand_cc(s, t, gamma, order):
    def corr(x):
        x = [unit(v) for v in x]
        coeff = [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
        return [[sum(coeff[p] * dot(a, b) ** p for p in range(order + 1)) for b in x] for a in x]

    cs, ct = corr(s), corr(t)
    n = len(s)
    return sum((cs[i][j] - ct[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize("gamma,order", [(0.4, 2), (1.0, 3)])
def test_cc_hand(gamma, order):
    s, t = randn(4, 3, seed=17), randn(4, 6, seed=18)
    close(cc_loss(s, t, gamma, order), hand_cc(s.tolist(), t.tolist(), gamma, order))


def test_cc_high_order_is_the_gaussian_rbf():
    """At a high order the Taylor series is the RBF exp(-gamma ||x - y||^2) of the normalised embeddings."""
    s, t = randn(4, 3, seed=19), randn(4, 5, seed=20)
    gamma = 0.4

    def rbf(x):
        x = [unit(v) for v in x]
        return [[math.exp(-gamma * norm(sub(a, b)) ** 2) for b in x] for a in x]

    rs, rt = rbf(s.tolist()), rbf(t.tolist())
    expected = sum((rs[i][j] - rt[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    close(cc_loss(s, t, gamma, order=25), expected, 1e-9)


def test_cc_zero_when_equal():
    s = randn(5, 4, seed=21)
    close(cc_loss(s, s.clone()), 0.0)


# ----------------------------------------------------------------- NST


def hand_nst(s, t):
    total = 0.0
    for xs, xt in zip(s, t):
        fs = [unit(flat(ch)) for ch in xs]
        ft = [unit(flat(ch)) for ch in xt]

        def mean_k(a, b):
            return sum(dot(u, v) ** 2 for u in a for v in b) / (len(a) * len(b))

        total += mean_k(ft, ft) + mean_k(fs, fs) - 2 * mean_k(ft, fs)
    return total / len(s)


def test_nst_hand():
    s, t = randn(2, 3, 2, 2, seed=22), randn(2, 4, 2, 2, seed=23)
    close(nst_loss(s, t), hand_nst(s.tolist(), t.tolist()))


def test_nst_zero_and_invariances():
    s, t = randn(2, 3, 3, 3, seed=24), randn(2, 5, 3, 3, seed=25)
    close(nst_loss(s, s.clone()), 0.0)
    base = float(nst_loss(s, t))
    assert base > 0
    # each channel is normalised: a positive scale per channel does not matter
    close(nst_loss(s * tensor([1.0, 4.0, 0.5]).view(1, 3, 1, 1), t), base)
    # the channels are samples of a distribution: their order does not matter
    close(nst_loss(s[:, [2, 0, 1]], t), base)
    with pytest.raises(ValueError):
        nst_loss(randn(2, 3, 4, 4), randn(2, 3, 2, 2))


# ----------------------------------------------------------------- FSP


def hand_fsp_matrix(a, b):
    """a: C1 x H x W, b: C2 x H x W nested lists of one sample."""
    h, w = len(a[0]), len(a[0][0])
    return [
        [sum(a[i][y][x] * b[j][y][x] for y in range(h) for x in range(w)) / (h * w) for j in range(len(b))]
        for i in range(len(a))
    ]


def test_fsp_matrix_hand():
    a, b = randn(2, 2, 3, 3, seed=26), randn(2, 4, 3, 3, seed=27)
    out = fsp_matrix(a, b)
    assert out.shape == (2, 2, 4)
    expected = [hand_fsp_matrix(x, y) for x, y in zip(a.tolist(), b.tolist())]
    assert torch.allclose(out, tensor(expected))


def test_fsp_loss_hand():
    s_pairs = [
        (randn(2, 2, 4, 4, seed=28), randn(2, 3, 4, 4, seed=29)),
        (randn(2, 3, 2, 2, seed=30), randn(2, 2, 2, 2, seed=31)),
    ]
    t_pairs = [
        (randn(2, 2, 4, 4, seed=32), randn(2, 3, 4, 4, seed=33)),
        (randn(2, 3, 2, 2, seed=34), randn(2, 2, 2, 2, seed=35)),
    ]
    expected = 0.0
    for (sa, sb), (ta, tb) in zip(s_pairs, t_pairs):
        for n in range(2):
            gs = hand_fsp_matrix(sa[n].tolist(), sb[n].tolist())
            gt = hand_fsp_matrix(ta[n].tolist(), tb[n].tolist())
            expected += sum((u - v) ** 2 for ru, rv in zip(gs, gt) for u, v in zip(ru, rv)) / 2
    close(fsp_loss(s_pairs, t_pairs), expected)
    close(fsp_loss(s_pairs, [(a.clone(), b.clone()) for a, b in s_pairs]), 0.0)


def test_fsp_checks():
    with pytest.raises(ValueError):
        fsp_matrix(randn(2, 2, 4, 4), randn(2, 2, 2, 2))
    with pytest.raises(ValueError):
        fsp_loss([(randn(2, 2, 4, 4), randn(2, 2, 4, 4))], [])


# ----------------------------------------------------------------- AB


def hand_ab(s, t, margin):
    total = 0.0
    for xs, xt in zip(s, t):
        for a, b in zip(flat(xs), flat(xt)):
            total += max(0.0, margin - a) ** 2 if b > 0 else max(0.0, margin + a) ** 2
    return total / len(s)


def test_ab_hand():
    s = [[0.5, -2.0, 3.0, 0.2], [-0.3, 1.5, -1.0, 0.0]]
    t = [[1.0, 2.0, -1.0, -0.5], [-2.0, 0.0, 0.7, 3.0]]
    # sample 1: (1-0.5)^2 + (1+2)^2 + (1+3)^2 + (1+0.2)^2 = 0.25 + 9 + 16 + 1.44
    # sample 2: (1-0.3)^2 + (1+1.5)^2 + (1+1)^2 + (1-0)^2  = 0.49 + 6.25 + 4 + 1
    assert hand_ab(s, t, 1.0) == pytest.approx((26.69 + 11.74) / 2)
    close(ab_loss(tensor(s), tensor(t), 1.0), hand_ab(s, t, 1.0))
    s4, t4 = randn(2, 3, 2, 2, seed=36), randn(2, 3, 2, 2, seed=37)
    close(ab_loss(s4, t4, 0.5), hand_ab(s4.tolist(), t4.tolist(), 0.5))


def test_ab_zero_beyond_margin_only():
    t = randn(3, 4, 2, 2, seed=38)
    s = torch.where(t > 0, 1.0 + t.abs(), -1.0 - t.abs())  # right side, at least the margin away
    close(ab_loss(s, t, 1.0), 0.0)
    # the teacher's own responses are mostly inside the margin: not zero
    assert float(ab_loss(t, t, 1.0)) > 0


# ----------------------------------------------------------------- FT


@pytest.mark.parametrize("p", [1, 2])
def test_ft_hand(p):
    s, t = randn(3, 2, 2, 2, seed=39), randn(3, 2, 2, 2, seed=40)
    expected = 0.0
    for a, b in zip(s.tolist(), t.tolist()):
        d = sub(unit(flat(a)), unit(flat(b)))
        expected += sum(abs(v) ** p for v in d) ** (1 / p)
    close(ft_loss(s, t, p), expected / 3)


def test_ft_zero_and_scale_invariance():
    s, t = randn(3, 8, seed=41), randn(3, 8, seed=42)
    close(ft_loss(s, s.clone()), 0.0)
    close(ft_loss(4.0 * s, 0.5 * t), float(ft_loss(s, t)))


# ----------------------------------------------------------------- VID


def hand_vid(mu, t, alpha, eps=1e-5):
    var = [math.log(1 + math.exp(a)) + eps for a in alpha]
    total = 0.0
    for m_n, t_n in zip(mu, t):
        for c, (m_c, t_c) in enumerate(zip(m_n, t_n)):
            for a, b in zip(flat(m_c), flat(t_c)):
                total += 0.5 * math.log(var[c]) + (b - a) ** 2 / (2 * var[c])
    return total / len(mu)


def test_vid_hand():
    mu, t = randn(2, 3, 2, 2, seed=43), randn(2, 3, 2, 2, seed=44)
    alpha = tensor([-1.0, 0.5, 2.0])
    close(vid_loss(mu, t, alpha), hand_vid(mu.tolist(), t.tolist(), alpha.tolist()))
    mu2, t2 = randn(4, 3, seed=45), randn(4, 3, seed=46)
    close(vid_loss(mu2, t2, alpha), hand_vid(mu2.tolist(), t2.tolist(), alpha.tolist()))


def test_vid_minimum_at_teacher():
    t = randn(2, 3, 2, 2, seed=47)
    alpha = tensor([-1.0, 0.5, 2.0])
    mu = t.clone().requires_grad_(True)
    loss = vid_loss(mu, t, alpha)
    var = [math.log(1 + math.exp(a)) + 1e-5 for a in alpha.tolist()]
    close(loss, sum(4 / 2 * math.log(v) for v in var))  # H*W = 4 positions per channel
    loss.backward()
    assert torch.allclose(mu.grad, torch.zeros_like(mu))
    with pytest.raises(ValueError):
        vid_loss(mu, t, tensor([0.0, 0.0]))


# ----------------------------------------------------------------- OFD


def hand_ofd(s, t, margin):
    total = 0.0
    for s_n, t_n in zip(s, t):
        for c, (s_c, t_c) in enumerate(zip(s_n, t_n)):
            for a, b in zip(flat(s_c), flat(t_c)):
                target = max(b, margin[c])
                if not (a <= target <= 0):
                    total += (target - a) ** 2
    return total / len(s)


def test_ofd_hand():
    margin = [-0.5, -1.0]
    # (B=2, C=2): every case of the partial L2
    s = [[-3.0, 0.5], [2.0, -0.2]]
    t = [[-2.0, 1.0], [-0.1, -4.0]]
    # n=0 c=0: target max(-2, -0.5) = -0.5, s=-3 <= target <= 0 -> skipped
    # n=0 c=1: target 1.0 > 0 -> (1 - 0.5)^2 = 0.25
    # n=1 c=0: target -0.1, s=2 > target -> (-0.1 - 2)^2 = 4.41
    # n=1 c=1: target max(-4, -1) = -1, s=-0.2 > target -> (-1 + 0.2)^2 = 0.64
    assert hand_ofd(s, t, margin) == pytest.approx((0.25 + 4.41 + 0.64) / 2)
    close(ofd_loss(tensor(s), tensor(t), tensor(margin)), (0.25 + 4.41 + 0.64) / 2)
    s4, t4 = randn(2, 3, 2, 2, seed=48), randn(2, 3, 2, 2, seed=49)
    m3 = [-0.3, -0.8, -0.1]
    close(ofd_loss(s4, t4, tensor(m3)), hand_ofd(s4.tolist(), t4.tolist(), m3))


def test_ofd_zero_cases():
    t = randn(2, 3, 2, 2, seed=50)
    margin = tensor([-0.3, -0.8, -0.1])
    target = torch.maximum(t, margin.view(1, 3, 1, 1))
    close(ofd_loss(target, t, margin), 0.0)
    # below a negative target is no error either
    close(ofd_loss(torch.where(target <= 0, target - 5.0, target), t, margin), 0.0)


def test_ofd_margin_is_the_conditional_mean():
    x = np.linspace(-60.0, 0.0, 600001)
    for mean, std in [(0.0, 1.0), (1.0, 2.0), (-1.5, 0.5), (2.0, 1.0)]:
        density = np.exp(-0.5 * ((x - mean) / std) ** 2)
        expected = np.trapezoid(x * density, x) / np.trapezoid(density, x)
        got = ofd_margin(tensor([mean]), tensor([std]))
        assert float(got[0]) == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
    # closed form at mean 0: -std * sqrt(2 / pi)
    assert float(ofd_margin(tensor([0.0]), tensor([3.0]))[0]) == pytest.approx(-3.0 * math.sqrt(2 / math.pi))
    far = ofd_margin(tensor([40.0]), tensor([1.0]))  # Phi(-40) underflows a naive ratio
    assert -0.03 < float(far[0]) < 0


# ----------------------------------------------------------------- HCL


def hand_pool(m, level):
    """One H x W map -> level x level block means (H, W divisible by level)."""
    h, w = len(m), len(m[0])
    bh, bw = h // level, w // level
    out = [[0.0] * level for _ in range(level)]
    for i in range(level):
        for j in range(level):
            block = [m[y][x] for y in range(i * bh, (i + 1) * bh) for x in range(j * bw, (j + 1) * bw)]
            out[i][j] = sum(block) / len(block)
    return out


def hand_mse(a, b):
    fa, fb = flat(a), flat(b)
    return sum((u - v) ** 2 for u, v in zip(fa, fb)) / len(fa)


def hand_hcl_pair(s, t, levels_weights):
    loss = hand_mse(s, t)
    wsum = 1.0
    for level, weight in levels_weights:
        ps = [[hand_pool(ch, level) for ch in n] for n in s]
        pt = [[hand_pool(ch, level) for ch in n] for n in t]
        loss += weight * hand_mse(ps, pt)
        wsum += weight
    return loss / wsum


def test_hcl_hand():
    s8, t8 = randn(2, 2, 8, 8, seed=51), randn(2, 2, 8, 8, seed=52)
    s4, t4 = randn(2, 3, 4, 4, seed=53), randn(2, 3, 4, 4, seed=54)
    expected = hand_hcl_pair(s8.tolist(), t8.tolist(), [(4, 0.5), (2, 0.25), (1, 0.125)])
    expected += hand_hcl_pair(s4.tolist(), t4.tolist(), [(2, 0.5), (1, 0.25)])
    close(hcl_loss([s8, s4], [t8, t4]), expected)


def test_hcl_zero_and_checks():
    s = randn(2, 2, 8, 8, seed=55)
    close(hcl_loss([s], [s.clone()]), 0.0)
    with pytest.raises(ValueError):
        hcl_loss([s], [randn(2, 2, 4, 4)])


# ----------------------------------------------------------------- generic: gradients, purity

LAB = torch.tensor([0, 2, 1, 4])
MARGIN = tensor([-0.3, -0.8, -0.1])

# name: (call(students, teachers), student shapes, teacher shapes)
CASES = {
    "kd": (lambda s, t: kd_loss(s[0], t[0], 4.0), [(4, 5)], [(4, 5)]),
    "kd_standardized": (lambda s, t: kd_loss(standardize(s[0]), standardize(t[0]), 2.0), [(4, 5)], [(4, 5)]),
    "dkd": (lambda s, t: dkd_loss(s[0], t[0], LAB, 1.0, 8.0, 4.0), [(4, 5)], [(4, 5)]),
    "dist": (lambda s, t: dist_loss(s[0], t[0], 1.0, 1.0, 4.0), [(4, 5)], [(4, 5)]),
    "hint": (lambda s, t: hint_loss(s[0], t[0]), [(4, 3, 2, 2)], [(4, 3, 2, 2)]),
    "at": (lambda s, t: at_loss(s[0], t[0]), [(4, 3, 4, 4)], [(4, 5, 4, 4)]),
    "sp": (lambda s, t: sp_loss(s[0], t[0]), [(4, 3, 2, 2)], [(4, 6)]),
    "rkd_distance": (lambda s, t: rkd_distance_loss(s[0], t[0]), [(4, 3)], [(4, 5)]),
    "rkd_angle": (lambda s, t: rkd_angle_loss(s[0], t[0]), [(4, 3)], [(4, 5)]),
    "pkt": (lambda s, t: pkt_loss(s[0], t[0]), [(4, 3)], [(4, 5)]),
    "cc": (lambda s, t: cc_loss(s[0], t[0]), [(4, 3)], [(4, 5)]),
    "nst": (lambda s, t: nst_loss(s[0], t[0]), [(4, 3, 3, 3)], [(4, 2, 3, 3)]),
    "fsp": (
        lambda s, t: fsp_loss([(s[0], s[1])], [(t[0], t[1])]),
        [(4, 2, 3, 3), (4, 3, 3, 3)],
        [(4, 2, 3, 3), (4, 3, 3, 3)],
    ),
    "ab": (lambda s, t: ab_loss(s[0], t[0], 1.0), [(4, 3, 2, 2)], [(4, 3, 2, 2)]),
    "ft": (lambda s, t: ft_loss(s[0], t[0]), [(4, 3, 2, 2)], [(4, 3, 2, 2)]),
    "vid": (lambda s, t: vid_loss(s[0], t[0], s[1]), [(4, 3, 2, 2), (3,)], [(4, 3, 2, 2)]),
    "ofd": (lambda s, t: ofd_loss(s[0], t[0], MARGIN), [(4, 3, 2, 2)], [(4, 3, 2, 2)]),
    "hcl": (lambda s, t: hcl_loss([s[0]], [t[0]]), [(4, 2, 8, 8)], [(4, 2, 8, 8)]),
    "at_squared": (lambda s, t: at_loss(s[0], t[0], squared=True), [(4, 3, 4, 4)], [(4, 5, 4, 4)]),
    "ensemble_kd": (lambda s, t: ensemble_kd_loss(s[0], t[0], 4.0), [(4, 5)], [(3, 4, 5)]),
    "kdsvd": (lambda s, t: kdsvd_loss(s, t), [(4, 3, 3, 3), (4, 2, 2, 2)], [(4, 3, 3, 3), (4, 2, 2, 2)]),
}


def make_inputs(name):
    _, s_shapes, t_shapes = CASES[name]
    students = [randn(*shape, seed=100 + i).requires_grad_(True) for i, shape in enumerate(s_shapes)]
    teachers = [randn(*shape, seed=200 + i).requires_grad_(True) for i, shape in enumerate(t_shapes)]
    return students, teachers


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_reaches_student_not_detached_teacher(name):
    call = CASES[name][0]
    students, teachers = make_inputs(name)
    loss = call(students, [t.detach() for t in teachers])
    assert loss.dim() == 0
    loss.backward()
    for s in students:
        assert s.grad is not None
        assert torch.isfinite(s.grad).all()
        assert s.grad.abs().sum() > 0
    for t in teachers:
        assert t.grad is None


@pytest.mark.parametrize("name", sorted(CASES))
def test_undetached_teacher_works_and_inputs_unchanged(name):
    call = CASES[name][0]
    students, teachers = make_inputs(name)
    before = [x.detach().clone() for x in students + teachers]
    loss = call(students, teachers)
    loss.backward()
    for x, y in zip(students + teachers, before):
        assert torch.equal(x.detach(), y)
    for t in teachers:  # AB uses the teacher only through the sign 1[T > 0]: no gradient path there
        assert t.grad is None if name == "ab" else torch.isfinite(t.grad).all()


def test_standardize_gradient_and_purity():
    z = randn(3, 6, seed=300).requires_grad_(True)
    before = z.detach().clone()
    (standardize(z) * randn(3, 6, seed=301)).sum().backward()
    assert torch.equal(z.detach(), before)
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_float32_inputs():
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    for loss in [at_loss(s, t), sp_loss(s, t), nst_loss(s, t), rkd_angle_loss(s, t), pkt_loss(s, t)]:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert ofd_loss(s, t, torch.tensor([-0.5, -0.5, -0.5], dtype=DT)).dtype == torch.float32


# ----------------------------------------------------------------- benchmark normalisations


def test_at_squared_hand():
    per = [sum(v * v for v in sub(hand_attention(s, 2), hand_attention(t, 2))) / 4 for s, t in zip(S_MAP, T_MAP)]
    close(at_loss(tensor(S_MAP), tensor(T_MAP), squared=True), sum(per) / 2)


def test_mean_reductions_rescale_the_paper_forms():
    s, t = randn(4, 3, seed=60), randn(4, 5, seed=61)
    close(pkt_loss(s, t, reduction="mean"), float(pkt_loss(s, t)) / 4)
    mu, tv = randn(2, 3, 2, 2, seed=62), randn(2, 3, 2, 2, seed=63)
    alpha = tensor([-1.0, 0.5, 2.0])
    close(vid_loss(mu, tv, alpha, reduction="mean"), float(vid_loss(mu, tv, alpha)) / 12)
    a, b = randn(3, 2, 2, 2, seed=64), randn(3, 2, 2, 2, seed=65)
    close(ft_loss(a, b, reduction="mean"), float(ft_loss(a, b)) / 8)
    pairs_s = [(randn(2, 2, 3, 3, seed=66), randn(2, 3, 3, 3, seed=67))]
    pairs_t = [(randn(2, 2, 3, 3, seed=68), randn(2, 3, 3, 3, seed=69))]
    close(fsp_loss(pairs_s, pairs_t, reduction="mean"), float(fsp_loss(pairs_s, pairs_t)) / 6)
    with pytest.raises(ValueError, match="reduction"):
        pkt_loss(s, t, reduction="sum")


# ----------------------------------------------------------------- CRD


def test_crd_nce_hand():
    pos, neg = [0.5, 2.0], [[0.1, 0.3, 0.05], [1.0, 0.2, 0.4]]
    noise, eps = 3 / 6, 1e-7  # N / M with N = 3 negatives, M = 6 training samples
    expected = 0.0
    for p, row in zip(pos, neg):
        expected -= math.log(p / (p + noise + eps)) + sum(math.log(noise / (q + noise + eps)) for q in row)
    close(crd_nce_loss(tensor(pos), tensor(neg), 6), expected / 2)


def test_crd_nce_rewards_a_separating_critic_and_checks_shapes():
    good = crd_nce_loss(tensor([50.0, 40.0]), tensor([[1e-5, 2e-5], [1e-5, 1e-5]]), 100)
    bad = crd_nce_loss(tensor([1e-3, 2e-3]), tensor([[50.0, 40.0], [30.0, 20.0]]), 100)
    assert 0 <= float(good) < 0.1 < float(bad)
    pos = randn(3, seed=70).exp().requires_grad_(True)
    neg = randn(3, 4, seed=71).exp().requires_grad_(True)
    crd_nce_loss(pos, neg, 50).backward()
    assert (pos.grad < 0).all() and (neg.grad > 0).all()  # raise the positive's score, lower the negatives'
    with pytest.raises(ValueError):
        crd_nce_loss(randn(3), randn(2, 4), 10)


# ----------------------------------------------------------------- ensemble KD


def test_ensemble_kd_hand():
    s, t = [[1.0, 0.0, -1.0]], [[[2.0, 0.0, 0.0]], [[0.0, 1.0, 3.0]]]
    temp, w = 2.0, [0.25, 0.75]

    def softmax(z):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    target = [sum(wm * softmax(tm[0])[k] for wm, tm in zip(w, t)) for k in range(3)]
    ps = softmax(s[0])
    expected = temp**2 * sum(q * math.log(q / p) for q, p in zip(target, ps))
    close(ensemble_kd_loss(tensor(s), tensor(t), temp, tensor(w)), expected)
    uniform = ensemble_kd_loss(tensor(s), tensor(t), temp)
    close(uniform, float(ensemble_kd_loss(tensor(s), tensor(t), temp, tensor([0.5, 0.5]))))
    close(ensemble_kd_loss(tensor(s), tensor([s]), temp), float(kd_loss(tensor(s), tensor(s), temp)))


# ----------------------------------------------------------------- KD-SVD


def _svd_map(theta):
    """A (1, 2, 1, 2) map whose (H*W, C) matrix has singular values 3, 1 and top right singular vector
    (cos theta, sin theta): x = diag(3, 1) V^T with V the rotation by theta."""
    c, s = math.cos(theta), math.sin(theta)
    x = [[3 * c, 3 * s], [-s, c]]  # rows: positions, columns: channels
    return tensor([[[[x[0][0], x[1][0]]], [[x[0][1], x[1][1]]]]])


def test_kdsvd_hand():
    # Teacher: both layers have top vector e1. Student: layer 1 e1, layer 2 (cos 30deg, sin 30deg). The
    # alignment puts every vector in the teacher's sign convention, the same for both teacher layers.
    theta = math.pi / 6
    u1, u2, e1 = [1.0, 0.0], [math.cos(theta), math.sin(theta)], [1.0, 0.0]

    def rbf(a, b):
        return [[math.exp(-((a[c] - b[d]) ** 2) / 8) for d in range(2)] for c in range(2)]

    g_s, g_t = rbf(u2, u1), rbf(e1, e1)
    expected = sum((g_s[c][d] - g_t[c][d]) ** 2 for c in range(2) for d in range(2))
    teacher = [_svd_map(0.0), _svd_map(0.0)]
    close(kdsvd_loss([_svd_map(0.0), _svd_map(theta)], teacher), expected, 1e-7)
    close(kdsvd_loss(teacher, [x.clone() for x in teacher]), 0.0)
    with pytest.raises(ValueError, match="channel"):
        kdsvd_loss([randn(1, 3, 2, 2), randn(1, 3, 2, 2)], [randn(1, 2, 2, 2), randn(1, 3, 2, 2)])


def _background_map(seed):
    """(4, 8, 3, 3) maps whose last four positions repeat the fifth, as a uniform background does: each (9, 8)
    matrix has rank 5, so three of its singular values are zero, and equal."""
    x = randn(4, 8, 3, 3, seed=seed).flatten(2)
    return torch.cat([x[:, :, :5], x[:, :, 4:5].expand(-1, -1, 4)], dim=2).view(4, 8, 3, 3)


def test_kdsvd_gradient_of_rank_deficient_maps():
    # The top singular vectors are smooth functions of such a map; torch's SVD gradient is NaN there (0 / 0 for
    # each pair of equal unused singular values). The gradient must be the finite differences' one.
    teacher = [_background_map(1), randn(4, 8, 2, 2, seed=2)]
    student = (_background_map(3).requires_grad_(True), randn(4, 8, 2, 2, seed=4).requires_grad_(True))
    assert torch.autograd.gradcheck(lambda *s: kdsvd_loss(s, teacher), student)
    dead = torch.zeros(4, 8, 3, 3, dtype=DT, requires_grad=True)  # no singular vectors at all: no gradient
    kdsvd_loss([dead, student[1]], teacher).backward()
    assert torch.isfinite(dead.grad).all()
