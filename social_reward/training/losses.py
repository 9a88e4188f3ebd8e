"""Losses over (prompt, preferred image, other image) embeddings."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TripletLoss(nn.Module):
    """mean(relu(|a - p|^2 - |a - n|^2 + margin)), squared Euclidean distances summed over the feature dimension.

    Example:
        loss_fn = TripletLoss(margin=0.2)
        anchor, positive, negative = torch.randn(16, 256), torch.randn(16, 256), torch.randn(16, 256)
        loss = loss_fn(anchor, positive, negative)
    """

    uses_logit_scale = False

    def __init__(self, margin=0.3):
        super().__init__()
        self.margin = margin

    def forward(self, anchor, positive, negative):
        distance_positive = (anchor - positive).pow(2).sum(1)
        distance_negative = (anchor - negative).pow(2).sum(1)
        return F.relu(distance_positive - distance_negative + self.margin).mean()


class PairwiseLoss(nn.Module):
    """Bradley-Terry (PickScore-style) cross-entropy: the preferred image should win the softmax over the two
    prompt-image similarities scaled by the model's logit_scale (which therefore trains with it).

    Example:
        loss_fn = PairwiseLoss()
        text, pos, neg = (F.normalize(torch.randn(16, 256), dim=-1) for _ in range(3))
        loss = loss_fn(text, pos, neg, logit_scale=torch.tensor(100.0))
    """

    uses_logit_scale = True

    def forward(self, anchor, positive, negative, logit_scale):
        logits = logit_scale * torch.stack([(anchor * positive).sum(1), (anchor * negative).sum(1)], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
