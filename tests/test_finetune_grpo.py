"""GRPO, ReFL under any reward and normalised rewards in finetune_generator.py, on the tiny pipelines."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP
from safetensors.torch import load_file

from clip_model import InputError, load_model
from finetune_generator import finetune_generator as finetune, grpo_sample, grpo_train
from generators import LORA_WEIGHTS, add_lora, denoiser, load_pipeline
from reward import RewardMix

PROMPTS = ["a red circle", "two blue squares"]
# 32 px images, 4 steps, no guidance; GRPO: 2 prompts x a group of 8, every step trained
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


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_grpo_raises_the_reward_of_a_unet_and_a_flow_family(family, tiny_pipelines, files, tmp_path):
    steps = {"sd": 15, "flux": 10}[family]
    finetune(tiny_pipelines(family), files["prompts"], f"ours={files['clip']}", max_train_steps=steps,
             checkpointing_steps=steps, validation_prompts=files["prompts"], output_dir=str(tmp_path / family),
             **TINY_GRPO)
    metrics = pd.read_csv(tmp_path / family / "metrics.csv")
    assert list(metrics.columns) == ["step", "loss", "reward", "val_reward", "kl", "clipped", "reward_ours"]
    assert (metrics.clipped[1:] == 0).all()  # one update per sampled batch: the ratio is 1 at every trained step
    assert metrics.val_reward.iloc[-1] > metrics.val_reward.iloc[0] + 1e-3


def test_grpo_never_differentiates_the_reward(tiny_sd, files):
    pipeline = load_pipeline(tiny_sd)
    lora_params = add_lora(pipeline, 4, 4)
    rewards = RewardMix.load([("ours", files["clip"], 1.0)])
    seen = []
    score = rewards.scores
    rewards.scores = lambda images, prompts, **kw: seen.append((images.requires_grad, torch.is_grad_enabled())) or \
        score(images, prompts, **kw)

    class Accelerator:  # what grpo_train uses of accelerate
        backward = staticmethod(lambda loss: loss.backward())
        unwrap_model = staticmethod(lambda model: model)
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
    resumed = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "resumed"),
                       resume_from_checkpoint="latest", **run)
    expected, ours = load_file(whole), load_file(resumed)
    assert all(torch.equal(expected[k], ours[k]) for k in expected)
    buffers = [json.load(open(tmp_path / name / "checkpoint-4" / "progress.json"))["prompt_stats"]
               for name in ("whole", "resumed")]
    assert buffers[0] == buffers[1] and len(buffers[0]["clip"]["buffers"]["a red circle"]) == 16


def test_grpo_on_two_processes_ends_on_the_lora_of_one_with_twice_the_batch(tiny_sd, files, tmp_path):
    args = dict(TINY_GRPO, group_size=4, max_train_steps=2, checkpointing_steps=2, reward_norm="prompt")
    finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "one"), **args)
    flags = [f"--{k}={v}" for k, v in dict(args, train_batch_size=1).items()]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "finetune_generator.py", "--pretrained_model_name_or_path", tiny_sd, "--prompts",
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
