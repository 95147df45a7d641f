"""Losses rewritten for speed (issue 19) against the formulas they replace, written out here the old way: the same
values and the same gradients on fixed tensors."""

import torch
import torch.nn.functional as F

from kdrun.losses import ab_loss, hcl_loss, ofd_loss
from kdrun.losses.features import _top_singular
from kdrun.methods.crd import CRD

DT = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def test_ofd_loss_matches_the_masked_square_it_replaces():
    t, m = _randn(3, 4, 5, 5, seed=1), -_randn(4, seed=2).abs()
    t[0, 0] = m[0] - 1.0  # a channel whose target is the margin everywhere
    s = _randn(3, 4, 5, 5, seed=3)
    s[1] = torch.maximum(t[1], m.view(4, 1, 1))  # the student on the target: zero terms either way

    def old(s, t):
        target = torch.maximum(t, m.view(1, 4, 1, 1))
        skip = (s <= target) & (target <= 0)
        sq = (target - s).pow(2)
        return torch.where(skip, torch.zeros_like(sq), sq).sum() / s.shape[0]

    (want, want_grad), (got, got_grad) = (_value_and_grad(lambda s: old(s, t), s),
                                          _value_and_grad(lambda s: ofd_loss(s, t, m), s))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    # an undetached teacher gets the gradient of the target max(T, m) too
    (_, want_grad), (_, got_grad) = (_value_and_grad(lambda t: old(s, t), t),
                                     _value_and_grad(lambda t: ofd_loss(s, t, m), t))
    torch.testing.assert_close(got_grad, want_grad)


def test_ab_loss_matches_the_relu_square_it_replaces():
    t, s = _randn(3, 4, 5, 5, seed=30), _randn(3, 4, 5, 5, seed=31)
    t[0, 0, 0] = 0.0  # rho(0) = 0: the student is pushed below -margin there
    s[1] = torch.where(t[1] > 0, 1.0, -1.0)  # the student on the margin: zero terms

    def old(s):
        sign = (t > 0).to(s.dtype) * 2 - 1
        return F.relu(0.5 - sign * s).pow(2).flatten(1).sum(dim=1).mean()

    (want, want_grad), (got, got_grad) = _value_and_grad(old, s), _value_and_grad(lambda s: ab_loss(s, t, 0.5), s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_hcl_loss_matches_pooling_student_and_teacher_separately():
    teacher = [_randn(2, 3, 8, 8, seed=4), _randn(2, 5, 7, 7, seed=5), _randn(2, 5, 1, 1, seed=6)]
    student = [_randn(*t.shape, seed=7 + i) for i, t in enumerate(teacher)]

    def old(feats):
        total = 0.0
        for fs, ft in zip(feats, teacher):
            loss, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
            for level in (4, 2, 1):
                if level < min(fs.shape[2:]):
                    weight /= 2.0
                    pooled = F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level)
                    loss, weight_sum = loss + weight * F.mse_loss(*pooled), weight_sum + weight
            total = total + loss / weight_sum
        return total

    want = old(student)
    got = hcl_loss(student, teacher)
    torch.testing.assert_close(got, want)
    leaves = [s.clone().requires_grad_(True) for s in student]
    want_grads = torch.autograd.grad(old(leaves), leaves)
    got_grads = torch.autograd.grad(hcl_loss(leaves, teacher), leaves)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_crd_dense_scores_match_autograd_through_gather_and_survive_a_bank_update():
    memory = F.normalize(_randn(50, 6, seed=10), dim=1)
    idx = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(11))
    v = _randn(4, 6, seed=12)
    weights = _randn(4, 12, seed=13)
    want, want_grad = _value_and_grad(lambda v: (torch.gather(v @ memory.T, 1, idx) * weights).sum(), v)

    bank = memory.clone()
    leaf = v.clone().requires_grad_(True)
    scores = CRD.scores(bank, leaf, idx)  # 50 <= 8 * 12: the dense product
    bank.index_copy_(0, torch.tensor([0, 1]), torch.zeros(2, 6, dtype=DT))  # as the step does before the backward
    (scores * weights).sum().backward()
    torch.testing.assert_close((scores * weights).sum().detach(), want)
    torch.testing.assert_close(leaf.grad, want_grad)


def test_top_singular_vectors_from_the_gram_eigendecomposition_match_the_svds():
    """KD-SVD's student vectors come from eigh of the smaller Gram matrix (A^T A for a tall map, A A^T for a wide
    one), their signs set later by the alignment: the singular values, the vectors up to sign, and the gradient of
    a sign-blind function of both are those of torch's own SVD and its autograd (full-rank maps, where that gradient
    is finite), as they are with `signed=True` (LAPACK's SVD, the backward the two share)."""

    def torch_svd(x, k):
        _, s, vh = torch.linalg.svd(x.flatten(2).transpose(1, 2), full_matrices=False)
        return F.normalize(vh[:, :k].transpose(1, 2), dim=1), F.normalize(s[:, :k], dim=1)

    for shape, k in (((3, 6, 5, 5), 4), ((3, 10, 3, 3), 4)):  # (25, 6): tall; (9, 10): wide
        a = _randn(*shape, seed=20)
        w_s, w_v = _randn(k, seed=21), _randn(shape[1], 2, seed=22)
        results = []
        for top in (torch_svd, lambda x, k: _top_singular(x, k, True), lambda x, k: _top_singular(x, k, False)):
            x = a.clone().requires_grad_(True)
            vectors, values = top(x, k)
            f = (values * w_s).sum() + ((vectors.transpose(1, 2) @ w_v) ** 2).sum()  # blind to each vector's sign
            results.append((values.detach(), vectors.detach().abs(), f.detach(), torch.autograd.grad(f, x)[0]))
        for other in results[1:]:
            for want, got in zip(results[0], other):
                torch.testing.assert_close(got, want)
