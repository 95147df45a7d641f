"""Several teachers as one model (`teachers=[...]`), and the view of it that the teacher cache stores."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Ensemble(nn.Module):
    """Several teachers as one module. `forward` gives the log of their averaged probabilities (usable as
    logits: its softmax is the ensemble's prediction); `members` gives each teacher."""

    def __init__(self, members: list[nn.Module], names: list[str]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.name = "+".join(names)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, K): every member's logits."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(x)
        return torch.logsumexp(F.log_softmax(logits, dim=2), dim=0) - math.log(len(logits))


class MemberLogits(nn.Module):
    """(B, M, K): an ensemble's members' logits per image, what the teacher cache stores for it."""

    def __init__(self, ensemble: Ensemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x).transpose(0, 1)
