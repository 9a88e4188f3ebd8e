import math

import torch

from losses import PairwiseLoss, TripletLoss


def test_triplet_loss_matches_hand_computation():
    anchor = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # squared distances 1 and 0
    negative = torch.tensor([[0.0, 2.0], [1.0, 1.5]])  # squared distances 4 and 0.25
    # relu(1 - 4 + 0.3) = 0 and relu(0 - 0.25 + 0.3) = 0.05; the mean is 0.025
    assert torch.isclose(TripletLoss()(anchor, positive, negative), torch.tensor(0.025))


def test_triplet_loss_default_margin_is_the_originals():
    assert TripletLoss().margin == 0.3
    same = torch.ones(3, 4)
    assert torch.isclose(TripletLoss()(same, same, same), torch.tensor(0.3))
    assert torch.isclose(TripletLoss(margin=0.2)(same, same, same), torch.tensor(0.2))


def test_triplet_loss_sums_squared_distance_over_features():
    anchor, positive, negative = torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7)
    expected = torch.clamp(((anchor - positive) ** 2).sum(1) - ((anchor - negative) ** 2).sum(1) + 0.3, min=0).mean()
    assert torch.allclose(TripletLoss()(anchor, positive, negative), expected)


def test_pairwise_loss_matches_hand_computation():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # cosines 0.6 and 1.0
    negative = torch.tensor([[0.8, 0.6], [1.0, 0.0]])  # cosines 0.8 and 0.0
    scale = torch.tensor(10.0)
    # -log softmax([6, 8])[0] = log(1 + e^2); -log softmax([10, 0])[0] = log(1 + e^-10)
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-10))) / 2
    assert torch.isclose(PairwiseLoss()(anchor, positive, negative, scale), torch.tensor(expected))


def test_pairwise_loss_trains_the_logit_scale():
    scale = torch.tensor(5.0, requires_grad=True)
    PairwiseLoss()(torch.eye(2), torch.eye(2), torch.eye(2).flip(0), scale).backward()
    assert scale.grad is not None and scale.grad != 0
    assert PairwiseLoss.uses_logit_scale and not TripletLoss.uses_logit_scale
