"""Losses of the continual-learning methods (kdrun/methods: er, dgr, lwf, ewc, mas...).

Every function here is pure: tensors (and plain numbers) in, a scalar tensor out, no state, no in-place change of
its inputs. The previous model's outputs are expected to be detached by the caller.
"""

import torch
import torch.nn.functional as F

from kdrun.losses.logits import kd_loss


def vae_loss(x: torch.Tensor, recon_logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The negative ELBO of a VAE with Bernoulli pixels and a standard-normal prior, per pixel (divided by the D
    pixels of an image, as van de Ven's code normalises it) and averaged over the batch:

        (1/D) * [ sum_d BCE(sigmoid(recon_logits_d), x_d) + 0.5 * sum_k (exp(logvar_k) + mu_k^2 - 1 - logvar_k) ]

    x: (B, ...) pixels in [0, 1]; recon_logits: the decoder's logits, same shape; mu, logvar: (B, K), the encoder's
    Gaussian q(z|x).
    """
    b = x.shape[0]
    recon = F.binary_cross_entropy_with_logits(recon_logits.reshape(b, -1).float(), x.reshape(b, -1).float(),
                                               reduction="none").sum(1)
    kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).float().sum(1)
    return ((recon + kl) / x[0].numel()).mean()


def replay_distill_loss(logits: torch.Tensor, previous_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """DGR+distill's replayed loss (van de Ven & Tolias): the cross-entropy of the student's softened distribution
    over its K classes against the previous model's over its first M <= K ("the old classes", the targets of the
    other K - M classes zero), times T^2, averaged over the batch:

        T^2 * mean_b [ -sum_{c<M} softmax(previous/T)_c * log softmax(logits/T)_c ]
    """
    m = previous_logits.shape[1]
    target = F.softmax(previous_logits.float() / temperature, dim=1)
    log_p = F.log_softmax(logits.float() / temperature, dim=1)[:, :m]
    return -(target * log_p).sum(1).mean() * temperature**2


def quadratic_penalty(params, importances, anchors) -> torch.Tensor:
    """EWC's and MAS's penalty before its weight: sum_i importance_i * (theta_i - anchor_i)^2, over every element
    of every parameter (the three sequences aligned)."""
    terms = [(w * (p - a) ** 2).sum() for p, w, a in zip(params, importances, anchors)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def lwf_loss(logits: torch.Tensor, previous_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Li & Hoiem's (TPAMI 2017, eq. 2) distillation term L_old on the old classes' logits, batch mean:

        KL(softmax(previous / T) || softmax(logits / T)) = -sum_c y'_c log yhat'_c - H(y')

    logits, previous_logits: (B, M), the new and the previous model's logits of the M old classes. The paper writes
    the cross-entropy -sum y' log yhat'; this is it less the entropy of the previous model's y', a constant of the
    new model (the same gradient, and 0 when the new model reproduces the old outputs). No T^2 factor (the paper
    has none, unlike Hinton's KD): it is `kd_loss` / T^2.
    """
    return kd_loss(logits, previous_logits, temperature) / temperature**2


def grad_cam(activation: torch.Tensor, score: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of the (B, K, H, W) `activation` of a layer for the (B,) class
    scores `score` (each image's score computed from its own activation): channel weights alpha_k = the spatial
    mean of d score / d A_k, map ReLU(sum_k alpha_k A_k), (B, H, W).

    `create_graph`: the gradient keeps its graph (double backward), so the map is differentiable with respect to
    everything the activation and the score depend on, the weights alpha included; LwM needs this for the new
    model. False for a frozen model, whose map the caller detaches.
    """
    (grad,) = torch.autograd.grad(score.sum(), activation, create_graph=create_graph)
    return F.relu((grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1))


def attention_distillation_loss(previous_map: torch.Tensor, new_map: torch.Tensor) -> torch.Tensor:
    """Dhar et al.'s (CVPR 2019, eq. 2) L_AD: the L1 distance of the vectorised, L2-normalised attention maps,

        sum_j | Q_prev_j / ||Q_prev||_2 - Q_new_j / ||Q_new||_2 |,

    averaged over the batch. previous_map, new_map: (B, H, W) (or any (B, ...)); an all-zero map stays zero.
    """
    q_prev = F.normalize(previous_map.flatten(1), dim=1)
    q_new = F.normalize(new_map.flatten(1), dim=1)
    return (q_prev - q_new).abs().sum(1).mean()
