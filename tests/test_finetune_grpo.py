"""GRPO, ReFL under any reward and normalised rewards in finetune_generator.py, on the tiny pipelines."""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, require_extra
from grpo_learning import LEARNING_RATES
from safetensors.torch import load_file

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.training.generator import finetune_generator as finetune
from social_reward.generators.grpo import grpo_sample, grpo_train
from social_reward.generators.lora import LORA_WEIGHTS, add_lora
from social_reward.generators.sampling import denoise, schedule
from social_reward.generators.families import denoiser, load_pipeline
from social_reward.generators.grpo import group_advantages, noisy_step, trained_steps
from social_reward.reward.mix import RewardMix

require_extra('generators', 'diffusers', 'peft', 'transformers')

PROMPTS = ["a red circle", "two blue squares"]
# 32 px images, 4 steps, no guidance; GRPO: 2 prompts x a group of 8
TINY_GRPO = dict(method="grpo", sampling_steps=4, resolution=32, guidance_scale=1.0, learning_rate=2e-2, seed=0,
                 train_batch_size=2, group_size=8, kl_beta=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The prompts, a tiny CLIP reward (cosines near 0) and an aesthetic predictor on it whose scores sit near 65
    (PickScore's and the aesthetic predictor's ranges are as far from ImageReward's margin of 2)."""
    folder = tmp_path_factory.mktemp("files")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.manual_seed(0)
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), folder / "init.pth")
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    with torch.no_grad():
        mlp[-1].weight *= 100
        mlp[-1].bias += 65
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, folder / "aesthetic.pth")
    return {"prompts": str(folder / "prompts.txt"), "clip": f"clip:{folder / 'init.pth'},model={TINY_CLIP}",
            "far": f"aesthetic:{folder / 'aesthetic.pth'},clip={folder / 'init.pth'},model={TINY_CLIP}",
            "init": str(folder / "init.pth")}


def lora_b_moved(path):
    """Whether any LoRA B ("lora.up" in diffusers' UNet names), zero at the start, moved."""
    ups = [v for k, v in load_file(path).items() if "lora_B" in k or "lora.up" in k]
    return bool(ups) and any(v.abs().sum() > 0 for v in ups)


def test_refl_under_a_reward_far_from_0_moves_the_lora_and_raises_the_reward(tiny_sd, files, tmp_path):
    final = finetune(tiny_sd, files["prompts"], f"far={files['far']}", method="refl", sampling_steps=8, resolution=32,
                     guidance_scale=1.0, learning_rate=3e-2, seed=0, train_batch_size=2, max_train_steps=12,
                     checkpointing_steps=12, validation_prompts=files["prompts"], output_dir=str(tmp_path / "refl"))
    metrics = pd.read_csv(tmp_path / "refl" / "metrics.csv")
    assert metrics.reward_far[1:].between(60, 70).all()  # the raw scores, logged beside the total
    assert lora_b_moved(final)  # ImageReward's hinge relu(2 - 65) would leave it at 0
    assert metrics.val_reward.iloc[-1] > metrics.val_reward.iloc[0]


class Accelerator:  # what grpo_train uses of accelerate
    backward = staticmethod(lambda loss: loss.backward())
    unwrap_model = staticmethod(lambda model: model)


def lora_b(pipeline):
    return {n: p.detach().clone() for n, p in denoiser(pipeline).named_parameters() if "lora_B" in n}


@contextlib.contextmanager
def restored(params):
    """The parameters put back as they were afterwards (the module's sampled batch stays on-policy)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
                param.grad = None


@pytest.fixture(scope="module")
def sampled(tiny_sd, files):
    """A tiny SD with a LoRA already moved (B random, so the adapter matters), and one GRPO batch of it: 2 prompts x
    a group of 4 at 16 px, 6 DDIM steps with guidance."""
    pipeline = load_pipeline(tiny_sd)
    lora_params = add_lora(pipeline, 4, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in denoiser(pipeline).named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rewards = RewardMix.load([("ours", files["clip"], 1.0)])
    batch = grpo_sample(denoiser(pipeline), pipeline, rewards, PROMPTS, [(0, 0), (0, 1)], 4, 6, 7.5, (16, 16), None)
    return pipeline, lora_params, batch


def test_each_group_is_one_prompt_sampled_with_independent_noise(sampled):
    pipeline, _, (prompts, cond, latents, log_probs, raw, total) = sampled
    assert prompts == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    embeddings = cond["encoder_hidden_states"][8:]  # the conditional half (the empty prompt's first)
    for group in (slice(0, 4), slice(4, 8)):
        assert all(torch.equal(e, embeddings[group][0]) for e in embeddings[group])
    assert not torch.equal(embeddings[0], embeddings[4])
    plan = schedule(pipeline, 6, latents[0])
    for i in [None] + trained_steps(plan.scheduler):  # the start noise, then the noise each trained step injected
        if i is None:
            noise = latents[0]
        else:
            with torch.no_grad():
                step = noisy_step(plan.scheduler, denoise(pipeline, denoiser(pipeline), latents[i], plan.timesteps[i],
                                                          cond, 7.5), i, latents[i], prev_sample=latents[i + 1])
            noise = (latents[i + 1] - step.mean) / step.std
        flat = noise.flatten(1)
        correlation = torch.corrcoef(flat)
        # independent draws of 256 elements: correlations within +-0.3 (the same noise twice would give 1)
        assert (correlation - torch.eye(8)).abs().max() < 0.3, i
        assert abs(flat.std().item() - 1) < 0.1
    assert total.view(2, 4).std(1).min() > 0  # so every group has advantages


def test_the_ratio_is_exactly_1_at_the_first_update_and_the_update_gets_through(sampled):
    pipeline, lora_params, (prompts, cond, latents, log_probs, raw, total) = sampled
    plan = schedule(pipeline, 6, latents[0])
    steps = trained_steps(plan.scheduler)
    with torch.no_grad():  # the sampling log-probabilities recomputed under the same weights, bit for bit
        for i in steps:
            again = noisy_step(plan.scheduler, denoise(pipeline, denoiser(pipeline), latents[i], plan.timesteps[i],
                                                       cond, 7.5), i, latents[i], prev_sample=latents[i + 1])
            assert torch.equal(again.log_prob, log_probs[i]), i
    before = lora_b(pipeline)
    with restored(lora_params):
        stats = grpo_train(Accelerator, denoiser(pipeline), pipeline, cond, latents, log_probs, total, 4, 6, 7.5, None,
                           steps, 1e-4, 0.0)
        assert stats["clipped"] == 0 and abs(stats["adv_mean"]) < 1e-6 and abs(stats["adv_std"] - 1) < 1e-3
        assert torch.nn.utils.get_total_norm([p.grad for p in lora_params]) > 0 and stats["reward_std"] > 0
        torch.optim.AdamW(lora_params, lr=1e-3).step()
        after = lora_b(pipeline)
    assert all((after[n] - before[n]).abs().max() > 5e-4 for n in before)  # Adam's first step: lr where grad != 0


def test_a_grpo_update_raises_the_log_probability_of_the_high_advantage_trajectories(sampled):
    pipeline, lora_params, (prompts, cond, latents, log_probs, raw, total) = sampled
    plan = schedule(pipeline, 6, latents[0])
    steps = trained_steps(plan.scheduler)
    advantages = group_advantages(total, 4)
    with restored(lora_params), torch.no_grad():
        with torch.enable_grad():
            grpo_train(Accelerator, denoiser(pipeline), pipeline, cond, latents, log_probs, total, 4, 6, 7.5, None,
                       steps, 1e-4, 0.0)
        torch.optim.SGD(lora_params, lr=1.0).step()
        change = sum(noisy_step(plan.scheduler, denoise(pipeline, denoiser(pipeline), latents[i], plan.timesteps[i],
                                                        cond, 7.5), i, latents[i], prev_sample=latents[i + 1]).log_prob
                     - log_probs[i] for i in steps)
    # the trajectories with a positive advantage became more likely, those with a negative one less
    assert (advantages * change).sum() > 0
    assert change[advantages > 0].mean() > 0 > change[advantages < 0].mean()


@pytest.fixture(scope="module")
def pickscore_like(tmp_path_factory):
    """A tiny random transformers CLIPModel read by pickscore:, its scores near 72 (PickScore's sit near 20,
    ImageReward's near 0): a random CLIP unlike the suite's tiny init, and an offset far from 0."""
    from grpo_learning import save_tiny_pickscore_like
    return f"pickscore:{save_tiny_pickscore_like(tmp_path_factory.mktemp('pickscore') / 'pickscore')}"


# the GRPO flags at their defaults (benchmarks/grpo_learning.py's runs); what the tiny pipelines need of every method:
# small images, few steps, a learning rate for random 16-wide layers (the ReFL test above takes 3e-2)
TINY_DEFAULTS = dict(method="grpo", sampling_steps=6, resolution=16, train_batch_size=2, group_size=8, seed=0)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_grpo_with_its_defaults_raises_a_pickscore_like_reward_and_beats_its_base(family, tiny_pipelines, files,
                                                                                  pickscore_like, tmp_path):
    from social_reward.scoring.leaderboard import evaluate_generators
    from social_reward.generators.generate import generate
    pipeline = tiny_pipelines(family)
    final = finetune(pipeline, files["prompts"], f"pick={pickscore_like}", learning_rate=LEARNING_RATES[family],
                     max_train_steps=40, checkpointing_steps=40, validation_prompts=files["prompts"],
                     output_dir=str(tmp_path / "run"), **TINY_DEFAULTS)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics.columns) == ["step", "loss", "reward", "val_reward", "policy_loss", "kl", "clipped", "adv_mean",
                                     "adv_std", "reward_std", "grad_norm", "reward_pick"]
    logged = metrics[1:]
    assert (logged.clipped == 0).all() and (logged.kl == 0).all() and (logged.grad_norm > 0).all()
    assert logged.adv_mean.abs().max() < 1e-6 and (logged.adv_std - 1).abs().max() < 1e-3
    assert logged.reward_pick.between(60, 85).all() and (logged.reward_std > 0).all()
    assert metrics.val_reward.iloc[-1] > metrics.val_reward.iloc[0]
    # under evaluate_generators.py, image for image from the same noise: 2 prompts x 8 samples each
    out = str(tmp_path / "generations")
    for name, lora in (("base", None), ("grpo", os.path.dirname(final))):
        generate(pipeline, files["prompts"], name, out, samples=8, lora=lora, resolution=16, num_inference_steps=6)
    board, rates = evaluate_generators(os.path.join(out, "generations.parquet"), {"pick": pickscore_like},
                                       str(tmp_path / "table"), device="cpu", num_workers=0)
    rate = rates[(rates.generator == "grpo") & (rates.other == "base") & (rates["style"] == "all")].win_rate.item()
    means = board[board["style"] == "all"].set_index("generator")["mean"]
    assert rate > 0.5 and means["grpo"] > means["base"], (rate, means.to_dict())


def test_grpo_never_differentiates_the_reward(tiny_sd, files):
    pipeline = load_pipeline(tiny_sd)
    lora_params = add_lora(pipeline, 4, 4)
    rewards = RewardMix.load([("ours", files["clip"], 1.0)])
    seen = []
    score = rewards.scores
    rewards.scores = lambda images, prompts, **kw: seen.append((images.requires_grad, torch.is_grad_enabled())) or \
        score(images, prompts, **kw)
    prompts, cond, latents, log_probs, raw, total = grpo_sample(
        denoiser(pipeline), pipeline, rewards, PROMPTS, [(0,), (1,)], 4, 4, 1.0, (32, 32), None)
    assert seen == [(False, False)] and not total.requires_grad and not any(x.requires_grad for x in latents)
    stats = grpo_train(Accelerator, denoiser(pipeline), pipeline, cond, latents, log_probs, total, 4, 4, 1.0, None,
                       [0, 2], 1e-4, 0.04)
    assert all(p.grad is None for p in rewards.parameters())
    assert sum(p.grad.abs().sum() for p in lora_params) > 0 and stats["kl"] >= 0


def test_a_grpo_run_resumed_ends_on_the_uninterrupted_lora_and_prompt_buffers(tiny_sd, files, tmp_path):
    run = dict(TINY_GRPO, group_size=4, reward_norm="prompt", max_train_steps=4, checkpointing_steps=2)
    whole = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "whole"), **run)
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    # the metrics.csv of a version that logged fewer columns: the resumed file gets them, empty in the old rows
    rows = pd.read_csv(tmp_path / "whole" / "metrics.csv")
    rows[rows.step <= 2].drop(columns=["grad_norm", "adv_std"]).to_csv(tmp_path / "resumed" / "metrics.csv",
                                                                        index=False)
    resumed = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "resumed"),
                       resume_from_checkpoint="latest", **run)
    expected, ours = load_file(whole), load_file(resumed)
    assert all(torch.equal(expected[k], ours[k]) for k in expected)
    logged = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert sorted(logged.columns) == sorted(rows.columns) and logged.step.tolist() == rows.step.tolist()
    assert logged.grad_norm.isna().tolist() == [step <= 2 for step in rows.step]
    assert torch.allclose(torch.tensor(logged.policy_loss.values), torch.tensor(rows.policy_loss.values), atol=1e-6,
                          equal_nan=True)
    # a checkpoint saved without grpo_steps: the first noisy-steps version (it logged policy_loss) resumes, a
    # random-subset one (it did not) is refused
    for name, columns in (("first", rows.columns), ("older", [c for c in rows.columns if c != "policy_loss"])):
        old = shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / name / "checkpoint-2")
        progress = json.load(open(old / "progress.json"))
        del progress["run"]["grpo_steps"]
        json.dump(progress, open(old / "progress.json", "w"))
        rows[rows.step <= 2][columns].to_csv(tmp_path / name / "metrics.csv", index=False)
    assert load_file(finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "first"),
                              resume_from_checkpoint="latest", **run)).keys() == expected.keys()
    with pytest.raises(InputError, match="GRPO trained a seeded random subset of the steps there"):
        finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "older"),
                 resume_from_checkpoint="latest", **run)
    buffers = [json.load(open(tmp_path / name / "checkpoint-4" / "progress.json"))["prompt_stats"]
               for name in ("whole", "resumed")]
    assert buffers[0] == buffers[1] and len(buffers[0]["clip"]["buffers"]["a red circle"]) == 16


def test_grpo_on_two_processes_ends_on_the_lora_of_one_with_twice_the_batch(tiny_sd, files, tmp_path):
    args = dict(TINY_GRPO, group_size=4, max_train_steps=2, checkpointing_steps=2, reward_norm="prompt")
    finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "one"), **args)
    flags = [f"--{k}={v}" for k, v in dict(args, train_batch_size=1).items()]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "scripts/finetune_generator.py", "--pretrained_model_name_or_path", tiny_sd, "--prompts",
                          files["prompts"], "--scorer", files["clip"], "--output_dir", str(tmp_path / "two"), *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    expected, ours = load_file(tmp_path / "one" / LORA_WEIGHTS), load_file(tmp_path / "two" / LORA_WEIGHTS)
    assert expected.keys() == ours.keys()
    for k in expected:  # Adam's first steps are +-lr wherever a gradient is nonzero: float rounding only
        assert torch.allclose(expected[k], ours[k], rtol=0, atol=1e-4), (k, (expected[k] - ours[k]).abs().max())
    one, two = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("one", "two"))
    assert torch.allclose(torch.tensor(one.reward_clip[1:].values), torch.tensor(two.reward_clip[1:].values), atol=1e-5)


@pytest.mark.parametrize("flags, expected", [
    (dict(group_size=1), r"--group_size 1: must be at least 2"),
    (dict(method="draft", reward_norm="group"), "--reward_norm group: --method draft samples each prompt once"),
    (dict(reward_norm="calibrated"), "--reward_norm calibrated: give --calibration FILE"),
    (dict(timestep_fraction=0), r"--timestep_fraction 0: must be in \(0, 1\]"),
])
def test_bad_grpo_flags_end_in_one_line_before_anything_loads(flags, expected, tiny_sd, files, tmp_path):
    with pytest.raises(InputError, match=expected):
        finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "run"),
                 **{**TINY_GRPO, "max_train_steps": 1, **flags})
    assert not os.path.exists(tmp_path / "run")


def test_grpo_with_a_sampler_that_cannot_inject_noise_or_a_nonfinite_reward_ends_in_one_line(tiny_sd, files, tmp_path):
    no_noise = shutil.copytree(tiny_sd, tmp_path / "no-noise")
    config = json.load(open(no_noise / "scheduler" / "scheduler_config.json"))
    json.dump({**config, "set_alpha_to_one": True}, open(no_noise / "scheduler" / "scheduler_config.json", "w"))
    with pytest.raises(InputError, match="step 3 of DDIMScheduler injects no noise"):
        finetune(str(no_noise), files["prompts"], files["clip"], output_dir=str(tmp_path / "a"),
                 **{**TINY_GRPO, "max_train_steps": 1})
    weights = torch.load(files["init"], weights_only=True)
    weights["visual.proj"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(InputError, match="step 1: --scorer broken: a non-finite reward \\(nan\\) on the prompt '"):
        finetune(tiny_sd, files["prompts"], f"broken=clip:{tmp_path / 'nan.pth'},model={TINY_CLIP}",
                 output_dir=str(tmp_path / "b"), **{**TINY_GRPO, "max_train_steps": 1, "group_size": 2})
