import math

import numpy as np

import pytest
from conftest import require_extra
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from social_reward.errors import InputError
from social_reward.generators.grpo import (check_noisy_sampler, clipped_policy_loss, group_advantages,
    kl_to_reference, minibatches, noisy_step, step_std, trained_steps, train_on_trajectory)

require_extra('generators', 'diffusers', 'peft', 'transformers')


def sd_ddim(**overrides):
    """Stable Diffusion's DDIM schedule (scaled linear betas, 1000 training steps), as the tiny pipeline has it."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})


def gaussian(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def element_mean_log_prob(x, mean, std):
    return Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=tuple(range(1, x.dim())))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_noisy_step_is_diffusers_ddim_step_and_its_log_prob_the_gaussian_density(prediction_type):
    scheduler = sd_ddim(prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    latents, output, noise = gaussian((3, 4, 5, 5), 0), gaussian((3, 4, 5, 5), 1), gaussian((3, 4, 5, 5), 2)
    for i in (0, 4, 9):
        t = scheduler.timesteps[i]
        step = noisy_step(scheduler, output, i, latents, noise_level=0.8, noise=noise)
        expected = scheduler.step(output, t, latents, eta=0.8, variance_noise=noise).prev_sample
        assert torch.allclose(step.prev_sample, expected, atol=1e-5)
        # DDIM's eq. 12 and 16 by hand
        alpha = scheduler.alphas_cumprod[t]
        prev_t = t - 1000 // 10
        alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.alphas_cumprod[0]
        std = 0.8 * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
        if prediction_type == "epsilon":
            eps, x0 = output, (latents - (1 - alpha).sqrt() * output) / alpha.sqrt()
        else:
            eps, x0 = alpha.sqrt() * output + (1 - alpha).sqrt() * latents, alpha.sqrt() * latents - (1 - alpha).sqrt() * output
        mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std ** 2).sqrt() * eps
        assert torch.allclose(step.mean, mean, atol=1e-5) and torch.allclose(step.std.squeeze(), std)
        assert torch.allclose(step.log_prob, element_mean_log_prob(step.prev_sample, mean, std), atol=1e-5)


def test_flow_sde_step_is_flow_grpos_formula_and_its_log_prob_the_gaussian_density():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    latents, velocity, noise = gaussian((2, 16, 4, 4), 0), gaussian((2, 16, 4, 4), 1), gaussian((2, 16, 4, 4), 2)
    for i in (0, 3, 7):
        sigma, sigma_next = scheduler.sigmas[i].item(), scheduler.sigmas[i + 1].item()
        dt = sigma_next - sigma
        s = 0.7 * math.sqrt(sigma / (1 - (scheduler.sigmas[1].item() if sigma == 1 else sigma)))
        mean = latents * (1 + s ** 2 / (2 * sigma) * dt) + velocity * (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
        std = torch.tensor(s * math.sqrt(-dt))
        step = noisy_step(scheduler, velocity, i, latents, noise=noise)
        assert torch.allclose(step.mean, mean, atol=1e-5) and torch.allclose(step.std.squeeze(), std)
        assert torch.allclose(step.prev_sample, mean + std * noise, atol=1e-5)
        assert torch.allclose(step.log_prob, element_mean_log_prob(step.prev_sample, mean, std), atol=1e-5)
        # with no noise the SDE's mean is diffusers' Euler step of the ODE
        ode = noisy_step(scheduler, velocity, i, latents, noise_level=1e-6, noise=noise).mean
        assert torch.allclose(ode, latents + dt * velocity, atol=1e-5)


def test_flow_sde_keeps_the_flows_marginals():
    # data ~ N(0, c^2), x_sigma = (1 - sigma) x0 + sigma eps: the exact velocity E[eps - x0 | x] is linear in x; the
    # SDE from pure noise must end with the data's spread as the ODE does (a wrong drift correction would not)
    c2, n = 0.25, 200_000
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(60)
    x = gaussian((n, 1), 0)
    for i in range(60):
        sigma = scheduler.sigmas[i].item()
        velocity = x * (sigma - (1 - sigma) * c2) / ((1 - sigma) ** 2 * c2 + sigma ** 2)
        x = noisy_step(scheduler, velocity, i, x, noise=gaussian((n, 1), i + 1)).prev_sample
    assert abs(x.var().item() - c2) < 0.02 and abs(x.mean().item()) < 0.01


def test_log_prob_of_a_given_sample_is_the_sampling_ones_and_differentiable_in_the_model_output():
    for scheduler in (sd_ddim(), FlowMatchEulerDiscreteScheduler(shift=3.0)):
        scheduler.set_timesteps(6)
        latents, output, noise = gaussian((2, 4, 3, 3), 3), gaussian((2, 4, 3, 3), 4), gaussian((2, 4, 3, 3), 5)
        sampled = noisy_step(scheduler, output, 2, latents, noise=noise)
        output = output.clone().requires_grad_(True)
        again = noisy_step(scheduler, output, 2, latents, prev_sample=sampled.prev_sample)
        assert torch.allclose(again.log_prob, sampled.log_prob, atol=1e-6)
        again.log_prob.sum().backward()
        assert output.grad.abs().sum() > 0
        # the log-prob is highest where the model's mean is the sample: moving the output lowers it
        moved = noisy_step(scheduler, output.detach() + 0.1, 2, latents, prev_sample=sampled.prev_sample)
        at_mean = noisy_step(scheduler, output.detach(), 2, latents, prev_sample=sampled.mean)
        assert (moved.log_prob < at_mean.log_prob).all()


def test_group_advantages_equal_a_hand_computation():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 20.0, 20.0, 20.0, 24.0])
    # group 1: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5); group 2: mean 21, std sqrt(3)
    expected = torch.tensor([-2, -1, 0, 3, -1 / 3 ** 0.5 * 1, -1 / 3 ** 0.5, -1 / 3 ** 0.5, 3 / 3 ** 0.5])
    expected[:4] /= 3.5 ** 0.5
    assert torch.allclose(group_advantages(rewards, 4), expected, atol=1e-5)
    # any reward scale and offset gives the same advantages, to the float32 rounding of the rewards themselves: the
    # standardisation adds none (float32 arithmetic at 65 would lose 1e-4 of the spread's digits)
    far = rewards * 0.01 + 65
    assert torch.allclose(group_advantages(far, 4), expected, atol=1e-3)
    wide = far.double().view(2, 4)
    exact = ((wide - wide.mean(1, keepdim=True)) / (wide.std(1, unbiased=False, keepdim=True) + 1e-6)).flatten()
    assert torch.allclose(group_advantages(far, 4).double(), exact, atol=1e-6, rtol=0)
    assert torch.equal(group_advantages(torch.full((4,), 7.0), 2), torch.zeros(4))
    for size, count in ((1, 4), (3, 8)):
        with pytest.raises(InputError, match=f"--group_size {size}: {count} rewards do not divide into groups"):
            group_advantages(torch.zeros(count), size)


def test_clipped_loss_equals_a_hand_computation():
    log_prob = torch.tensor([0.0, 0.3, -0.3, 0.1])
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, 2.0, -1.0, 8.0])
    # ratios e^0, e^0.3 = 1.35, e^-0.3 = 0.741, e^0.1 = 1.105; clip range 0.2 -> [0.8, 1.2]; advantages clipped at 5
    # per sample: max(-A r, -A clip(r)):
    #   A=1,  r=1:     -1
    #   A=2,  r=1.35:  max(-2.70, -2.40) = -2.40   (the gain above 1 + c is cut)
    #   A=-1, r=0.741: max(0.741, 0.8)  = 0.8      (a lowered bad sample: the gain below 1 - c is cut)
    #   A=5,  r=1.105: max(-5.526, -5.526) = -5.526
    expected = (-1 - 2.4 + 0.8 - 5 * math.exp(0.1)) / 4
    loss = clipped_policy_loss(log_prob, old, advantages, clip_range=0.2)
    assert abs(loss.item() - expected) < 1e-5
    # at the sampling parameters (ratio 1) the loss is -mean(A) and its gradient -A / B
    log_prob = torch.zeros(4, requires_grad=True)
    clipped_policy_loss(log_prob, torch.zeros(4), advantages, 1e-4).backward()
    assert torch.allclose(log_prob.grad, -advantages.clamp(-5, 5) / 4)


def test_kl_to_reference_is_the_gaussian_kl_per_element():
    mean, reference, std = gaussian((2, 3, 4), 0), gaussian((2, 3, 4), 1), torch.tensor(0.3).reshape(1, 1, 1)
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(reference, std.expand_as(mean))).mean((1, 2))
    assert torch.allclose(kl_to_reference(mean, reference, std), expected, atol=1e-6)
    assert torch.equal(kl_to_reference(mean, mean, std), torch.zeros(2))


def test_a_sampler_that_cannot_inject_noise_ends_in_one_line():
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(4)
    with pytest.raises(InputError, match="EulerDiscreteScheduler cannot inject noise"):
        check_noisy_sampler(euler)
    to_one = sd_ddim(set_alpha_to_one=True)
    to_one.set_timesteps(4)
    with pytest.raises(InputError, match="step 3 of DDIMScheduler injects no noise"):
        check_noisy_sampler(to_one, steps=[0, 1, 2, 3])  # asked to train its noiseless last step
    for scheduler in (sd_ddim(), FlowMatchEulerDiscreteScheduler(shift=3.0)):
        scheduler.set_timesteps(4)
        check_noisy_sampler(scheduler)
        with pytest.raises(InputError, match="--noise_level 0"):
            check_noisy_sampler(scheduler, 0)


def test_a_ddim_scheduler_with_set_alpha_to_one_is_accepted_its_noiseless_last_step_untrained():
    # set_alpha_to_one makes the last DDIM step's variance 0; only the trained steps need noise, and that step is not
    # one of them (it samples deterministically)
    for steps in (4, 6, 50):
        to_one = sd_ddim(set_alpha_to_one=True)
        to_one.set_timesteps(steps)
        check_noisy_sampler(to_one)
        trained = trained_steps(to_one)
        assert step_std(to_one, steps - 1, torch.zeros(1, 1), 1.0).item() == 0 and steps - 1 not in trained
        assert all(step_std(to_one, i, torch.zeros(1, 1), 1.0).item() > 0 for i in trained) and trained


def test_trained_steps_leave_out_the_near_deterministic_steps_at_the_end():
    ddim, flow = sd_ddim(), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler, kept in ((ddim, [0, 1, 2, 3]), (flow, [0, 1, 2, 3, 4])):
        scheduler.set_timesteps(6)
        assert trained_steps(scheduler) == kept
        # the steps left out inject under a tenth of the largest std (DDIM's into t = 1 and t = 0: 0.04, 0.02 against
        # 0.38 and more; the flow's last, sigma 0.003 -> 0: 0.006 against 0.4 and more) and their log-probability is
        # the most sensitive to the model's output: its gradient there is mostly noise (x' - mean) / std^2
        stds = [step_std(scheduler, i, torch.zeros(1, 1), 0.7 if scheduler is flow else 1.0).item() for i in range(6)]
        assert all(stds[i] >= 0.1 * max(stds) for i in kept)
        assert all(stds[i] < 0.1 * max(stds) for i in range(len(kept), 6))
        sensitivity = []
        for i in range(6):
            output = torch.zeros(1, 64, requires_grad=True)
            step = noisy_step(scheduler, output, i, gaussian((1, 64), 0), prev_sample=gaussian((1, 64), 1))
            sensitivity.append(torch.autograd.grad(step.log_prob.sum(), output)[0].norm().item())
        assert max(sensitivity[len(kept):]) > 3 * max(sensitivity[:len(kept)])
    assert trained_steps(ddim, 0.5) == [0, 1] and trained_steps(flow, 0.01) == [0]


def sample(predict, scheduler, latents, noise):
    """A noise-injecting sampling loop (as generators.sample_latents runs with grpo's step): the latents before each
    step and the last, and each step's log-probability."""
    trajectory, log_probs = [latents], []
    for i in range(len(scheduler.timesteps)):
        step = noisy_step(scheduler, predict(trajectory[-1], i), i, trajectory[-1], noise=noise(i))
        trajectory.append(step.prev_sample)
        log_probs.append(step.log_prob)
    return trajectory, torch.stack(log_probs)


@pytest.mark.parametrize("make_scheduler", [sd_ddim, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)],
                         ids=["ddim", "flow"])
def test_grpo_raises_a_reward_of_a_toy_denoiser(make_scheduler):
    # a denoiser with one trainable offset; the reward is the final latents' first coordinate, far from 0 (+ 65):
    # group-standardised advantages make the offset's scale irrelevant
    from contextlib import nullcontext
    from social_reward.generators.grpo import train_on_trajectory
    torch.manual_seed(0)
    scheduler = make_scheduler()
    scheduler.set_timesteps(6)
    offset = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([offset], lr=0.1)
    predict = lambda x, i: torch.zeros_like(x) + offset
    rewards_seen = []
    for update in range(20):
        start = gaussian((16, 2), update)
        with torch.no_grad():
            trajectory, log_probs = sample(predict, scheduler, start, lambda i: gaussian((16, 2), 1000 * update + i))
        rewards = trajectory[-1][:, 0] + 65
        rewards_seen.append(rewards.mean().item())
        advantages = group_advantages(rewards, 8)
        optimizer.zero_grad()
        stats = train_on_trajectory(predict, scheduler, trajectory, log_probs, advantages, range(6), 1e-4, 0.0,
                                    lambda loss: loss.backward(), nullcontext)
        assert stats["clipped"] == 0  # one update per sampled batch: the ratio is 1 at every trained step
        optimizer.step()
    assert np.mean(rewards_seen[-3:]) > np.mean(rewards_seen[:3]) + 0.5


def test_train_on_trajectory_back_propagates_the_mean_clipped_loss_and_the_kl_to_the_reference():
    from contextlib import contextmanager
    from social_reward.generators.grpo import train_on_trajectory
    scheduler = sd_ddim()
    scheduler.set_timesteps(4)
    weight = torch.tensor(0.3, requires_grad=True)
    switched_off = [False]
    predict = lambda x, i: x * (0.0 if switched_off[0] else weight)

    @contextmanager
    def reference():
        switched_off[0] = True
        yield
        switched_off[0] = False
    with torch.no_grad():
        trajectory, log_probs = sample(predict, scheduler, gaussian((4, 3), 0), lambda i: gaussian((4, 3), i + 1))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    train_on_trajectory(predict, scheduler, trajectory, log_probs, advantages, [1, 3], 0.2, 0.1,
                        lambda loss: loss.backward(), reference)
    ours, weight.grad = weight.grad.clone(), None
    expected = 0
    for i in (1, 3):
        step = noisy_step(scheduler, predict(trajectory[i], i), i, trajectory[i], prev_sample=trajectory[i + 1])
        ref = noisy_step(scheduler, trajectory[i] * 0.0, i, trajectory[i], prev_sample=trajectory[i + 1])
        expected = expected + (clipped_policy_loss(step.log_prob, log_probs[i], advantages, 0.2)
                               + 0.1 * kl_to_reference(step.mean, ref.mean, step.std).mean()) / 2
    expected.backward()
    assert torch.allclose(ours, weight.grad, atol=1e-6) and ours != 0


def test_minibatches_keep_the_sampling_order_first_then_shuffle_each_pass_by_its_key():
    order = minibatches(5, 2, 3, (42, 0, 7))
    assert order[:3] == [[0, 1], [2, 3], [4]]  # the first pass as sampled, the last minibatch short
    assert [len(m) for m in order] == [2, 2, 1] * 3
    for inner in (1, 2):
        assert sorted(sum(order[3 * inner:3 * inner + 3], [])) == [0, 1, 2, 3, 4]  # each pass sees every prompt once
    assert order != minibatches(5, 2, 3, (42, 0, 8)) and order == minibatches(5, 2, 3, (42, 0, 7))
    assert sum(order[3:], []) != list(range(5)) * 2


@pytest.mark.parametrize("make_scheduler", [sd_ddim, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)],
                         ids=["ddim", "flow"])
def test_off_policy_minibatches_are_clipped_and_the_advantage_sign_sets_where_the_reward_goes(make_scheduler):
    # rounds of 4 groups of 8, each trained in minibatches of 2 groups for 2 passes (4 optimizer steps a round, the
    # last 3 off-policy), as finetune_generator's grpo does; the reward is the final latents' first coordinate, far
    # from 0 (+ 65). With the advantages as computed the expected reward rises; with their sign flipped it falls
    scheduler = make_scheduler()
    scheduler.set_timesteps(6)
    offset = torch.zeros(2, requires_grad=True)
    predict = lambda x, i: torch.zeros_like(x) + offset

    def expected_reward():  # on 256 fixed noises: the final latents are linear in the offset, so no sampling noise
        with torch.no_grad():
            trajectory, _ = sample(predict, scheduler, gaussian((256, 2), -1), lambda i: gaussian((256, 2), -2 - i))
        return trajectory[-1][:, 0].mean().item() + 65
    base = expected_reward()
    for sign in (1, -1):
        with torch.no_grad():
            offset.zero_()
        optimizer = torch.optim.Adam([offset], lr=0.05)
        clipped = []
        for number in range(10):
            with torch.no_grad():
                trajectory, log_probs = sample(predict, scheduler, gaussian((32, 2), number),
                                               lambda i: gaussian((32, 2), 1000 * number + i))
            trajectory = torch.stack(trajectory)
            advantages = sign * group_advantages(trajectory[-1][:, 0] + 65, 8)
            for groups in minibatches(4, 2, 2, (0, number)):
                images = [g * 8 + k for g in groups for k in range(8)]
                optimizer.zero_grad()
                stats = train_on_trajectory(predict, scheduler, trajectory[:, images], log_probs[:, images],
                                            advantages[images], range(6), 1e-4, 0.0, lambda loss: loss.backward())
                clipped.append(stats["clipped"])
                optimizer.step()
        # the first minibatch of each round is on-policy (ratio 1: nothing outside the clip), the later ones were
        # sampled by weights one to three steps older and the clip binds on them
        assert all(c == 0 for c in clipped[::4]) and np.mean([c for k, c in enumerate(clipped) if k % 4]) > 0.5
        assert (expected_reward() - base) * sign > 0.03, (sign, expected_reward(), base)
