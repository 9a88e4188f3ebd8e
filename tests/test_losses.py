import torch

from losses import TripletLoss


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
