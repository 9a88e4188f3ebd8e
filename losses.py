"""Losses over (prompt, preferred image, other image) embeddings."""
import torch.nn as nn
import torch.nn.functional as F


class TripletLoss(nn.Module):
    """mean(relu(|a - p|^2 - |a - n|^2 + margin)), squared Euclidean distances summed over the feature dimension.

    Example:
        loss_fn = TripletLoss(margin=0.2)
        anchor, positive, negative = torch.randn(16, 256), torch.randn(16, 256), torch.randn(16, 256)
        loss = loss_fn(anchor, positive, negative)
    """

    def __init__(self, margin=0.3):
        super().__init__()
        self.margin = margin

    def forward(self, anchor, positive, negative):
        distance_positive = (anchor - positive).pow(2).sum(1)
        distance_negative = (anchor - negative).pow(2).sum(1)
        return F.relu(distance_positive - distance_negative + self.margin).mean()
