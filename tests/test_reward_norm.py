import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.reward.mix import NonFiniteReward, RewardMix, reward_fn
from social_reward.reward.normalization import PromptStats, standardize
from social_reward.reward.differentiable import Reward
from social_reward.scorers.registry import load_scorer

PROMPTS = ["a red cube"] * 3 + ["a blue ball"] * 3


class Scaled(torch.nn.Module):
    """A scorer's model whose score is `factor` times the model's (its text embedding scaled, as PickScore's)."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def encode_image(self, images, normalize=True):
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens, normalize=True):
        return self.factor * self.model.encode_text(tokens, normalize=normalize)


def scaled(scorer, factor):
    return dataclasses.replace(scorer, model=Scaled(scorer.model, factor))


@pytest.fixture(scope="module")
def two_scales(tmp_path_factory):
    """Two tiny CLIP rewards of unrelated scales: a cosine near 0, and another model's score times 50 plus an
    offset's worth of scale (as PickScore's logit_scale puts it near 20)."""
    folder = tmp_path_factory.mktemp("rewards")
    specs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = str(folder / f"clip{seed}.pth")
        torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), path)
        specs.append(f"clip:{path},model={TINY_CLIP}")
    small = Reward(load_scorer(specs[0]))
    large = Reward(scaled(load_scorer(specs[1]), 50.0))
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return specs, small, large, images


def test_standardize_is_the_z_score_within_each_group():
    values = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    out = standardize(values, ["a", "a", "b", "b", "b"])
    b = np.array([10.0, 20.0, 30.0])
    assert torch.allclose(out, torch.tensor([-1.0, 1.0, *((b - b.mean()) / b.std())], dtype=torch.float32), atol=1e-5)


def test_prompt_stats_use_the_batch_until_a_prompt_has_min_count_then_its_own_buffer():
    stats = PromptStats(buffer_size=4, min_count=3)
    first = stats(torch.tensor([0.0, 2.0, 10.0, 12.0]), ["a", "a", "b", "b"])
    batch = np.array([0.0, 2.0, 10.0, 12.0])
    assert torch.allclose(first, torch.tensor((batch - batch.mean()) / batch.std(), dtype=torch.float32), atol=1e-5)
    # "a" now holds 0, 2, 4 (three: its own statistics); "c" holds 14 alone and is short: the batch's statistics
    second = stats(torch.tensor([4.0, 14.0]), ["a", "c"])
    a, last = np.array([0.0, 2.0, 4.0]), np.array([4.0, 14.0])
    assert abs(second[0].item() - (4 - a.mean()) / a.std()) < 1e-5
    assert abs(second[1].item() - (14 - last.mean()) / last.std()) < 1e-5
    stats(torch.tensor([6.0, 8.0]), ["a", "a"])
    assert stats.buffers["a"] == [2.0, 4.0, 6.0, 8.0]  # the last buffer_size
    # the state, saved and loaded, continues the same
    resumed = PromptStats()
    resumed.load_state_dict(stats.state_dict())
    batch = torch.tensor([5.0, 11.0]), ["a", "c"]
    assert torch.equal(resumed(*batch), stats(*batch))


def test_without_normalisation_the_larger_scale_decides_and_normalised_weights_combine_standardised_rewards(
        two_scales):
    _, small, large, images = two_scales
    with torch.no_grad():
        a, b = small.score(images, PROMPTS), large.score(images, PROMPTS)
        none_total, raw = RewardMix([small, large], [1.0, 1.0], "none", ["small", "large"])(images, PROMPTS)
        assert torch.allclose(raw["small"], a) and torch.allclose(raw["large"], b)
        assert torch.allclose(none_total, a + b)
        # the raw spreads differ by the scale: the sum is ordered as the large-scale reward alone
        assert b.std() > 10 * a.std()
        group_total, _ = RewardMix([small, large], [2.0, 1.0], "group", ["small", "large"])(images, PROMPTS)
    # as docs/reward.md says: total = sum of weight * (score - its prompt's mean) / (its prompt's std + 1e-6)
    z = lambda s: np.concatenate([(g - g.mean()) / (g.std() + 1e-6) for g in (s[:3], s[3:])])
    expected = 2.0 * z(a.numpy().astype(float)) + 1.0 * z(b.numpy().astype(float))
    assert np.allclose(group_total.numpy(), expected, atol=1e-4)


def test_calibrated_rewards_are_each_scorers_temperature_times_its_score(two_scales):
    _, small, large, images = two_scales
    small_t, large_t = Reward(small.scorer, temperature=40.0), Reward(large.scorer, temperature=0.5)
    with torch.no_grad():
        total, raw = RewardMix([small_t, large_t], [1.0, 3.0], "calibrated", ["small", "large"])(images, PROMPTS)
        assert torch.allclose(total, 40.0 * small.score(images, PROMPTS) + 3.0 * 0.5 * large.score(images, PROMPTS))
        assert torch.allclose(small_t(images, PROMPTS), 40.0 * raw["small"])  # Reward itself returns t * score
    with pytest.raises(InputError, match="--reward_norm calibrated: no calibration for small"):
        RewardMix([small, large_t], [1.0, 1.0], "calibrated", ["small", "large"])


def test_group_normalisation_keeps_the_gradient_to_the_images(two_scales):
    _, small, _, images = two_scales
    images = images.clone().requires_grad_(True)
    total, _ = RewardMix([small], [1.0], "group", ["small"])(images, PROMPTS)
    (total * torch.arange(6.0)).sum().backward()
    assert images.grad.abs().sum() > 0


def test_reward_fn_normalises_several_scorers_and_keeps_its_prompt_buffer_across_calls(two_scales):
    specs, _, _, images = two_scales
    fn = reward_fn({specs[0]: 1.0, specs[1]: 0.5}, reward_norm="prompt")
    with torch.no_grad():
        total, info = fn(images, PROMPTS, [{}] * 6)
        assert set(info) == set(specs) and total.shape == (6,)
        fn(images, PROMPTS, None)
    assert {len(v) for v in fn.mix.prompt_state()[specs[0]]["buffers"].values()} == {6}
    plain, info = reward_fn(specs[0])(images, PROMPTS, None)
    assert info == {} and torch.allclose(plain, Reward.load(specs[0])(images, PROMPTS))


def test_bad_normalisation_inputs_end_in_one_line(two_scales):
    specs, small, _, images = two_scales
    with pytest.raises(InputError, match="--reward_norm zscore: unknown; choose from none, group, prompt, calibrated"):
        reward_fn(specs[0], reward_norm="zscore")
    with pytest.raises(InputError, match="every prompt appears once in the batch"):
        RewardMix([small], [1.0], "group")(images[:2], ["one", "two"])
    with pytest.raises(InputError, match="give --calibration FILE"):
        RewardMix.load([("small", specs[0], 1.0)], reward_norm="calibrated")
    black = torch.zeros(2, 3, 64, 64)
    nan_reward = Reward(scaled(small.scorer, float("nan")))
    with pytest.raises(NonFiniteReward, match="--scorer ours: a non-finite reward \\(nan\\) on the prompt 'a red cube'"):
        RewardMix([nan_reward], [1.0], "none", ["ours"])(black, ["a red cube", "a blue ball"])


def test_reward_load_with_a_calibration_file_scores_in_log_odds_and_refuses_another_scorers(two_scales, tmp_path):
    import json
    from social_reward.scoring.calibration import calibration_entries
    specs, small, _, images = two_scales
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration_entries({"small": {"temperature": 40.0, "nll": 0.6, "ece": 0.01,
                                                              "pairs": 100}}, {"small": specs[0]})))
    calibrated = Reward.load(specs[0], calibration=str(path))
    with torch.no_grad():
        assert torch.allclose(calibrated(images, PROMPTS), 40.0 * small(images, PROMPTS))
        total, _ = reward_fn(specs[0], calibration=str(path))(images, PROMPTS, None)  # calibrated by default then
    assert torch.allclose(total, 40.0 * small(images, PROMPTS).detach())
    with pytest.raises(InputError, match="fitted for another scorer"):
        Reward.load(specs[1], calibration=str(path))
    with pytest.raises(InputError, match="--calibration goes with --reward_norm calibrated"):
        reward_fn(specs[0], reward_norm="group", calibration=str(path))


def test_a_non_finite_reward_never_enters_a_prompts_buffer():
    stats = PromptStats(buffer_size=4, min_count=2)
    stats.update(torch.tensor([1.0, float("nan"), 3.0]), ["a", "a", "b"])
    assert stats.buffers == {"a": [1.0], "b": [3.0]} and stats.batch == (2.0, 1.0)
    stats.update(torch.tensor([2.0]), ["a"])
    assert torch.isfinite(stats.normalize(torch.tensor([1.5]), ["a"])).all()
