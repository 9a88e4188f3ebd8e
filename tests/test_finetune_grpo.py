"""GRPO, ReFL under any reward and normalised rewards in finetune_generator.py, on the tiny pipelines."""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, require_extra
from grpo_learning import LEARNING_RATES
from safetensors.torch import load_file

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.training.generator import NOISY_STEPS, finetune_generator as finetune
from social_reward.generators import grpo
from social_reward.generators.grpo import grpo_train, sample_round
from social_reward.generators.lora import LORA_WEIGHTS, add_lora
from social_reward.generators.sampling import conditioning, denoise, schedule
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


class Accelerator:  # what grpo_train uses of accelerate, one process
    backward = staticmethod(lambda loss: loss.backward())
    unwrap_model = staticmethod(lambda model: model)


def one_process_trainer(pipeline, rewards, size, **flags):
    """What grpo.sample_round and grpo_train read of the training loop's trainer: one process, GRPO's flags."""
    flags = {**dict(group_size=4, sampling_steps=6, guidance_scale=7.5, noise_level=None, train_batch_size=2,
                    gradient_accumulation_steps=None, clip_range=1e-4, kl_beta=0.0), **flags}
    return SimpleNamespace(accelerator=Accelerator, model=denoiser(pipeline), pipeline=pipeline, rewards=rewards,
                           size=size, gather=None, accumulate=lambda sync: contextlib.nullcontext(),
                           flags=SimpleNamespace(**flags))


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
    trainer = one_process_trainer(pipeline, rewards, (16, 16))
    return pipeline, lora_params, trainer, sample_round(trainer, PROMPTS, [(0, 0), (0, 1)], None)


def test_each_group_is_one_prompt_sampled_with_independent_noise(sampled):
    pipeline, _, _, (prompts, latents, log_probs, raw, total, _) = sampled
    assert prompts == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    # (a round keeps its prompts, not their conditioning: each micro-batch makes its own)
    cond = conditioning(pipeline, prompts, 7.5, (16, 16))
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
    pipeline, lora_params, trainer, round = sampled
    latents, log_probs = round.latents, round.log_probs
    cond = conditioning(pipeline, round.prompts, 7.5, (16, 16))
    plan = schedule(pipeline, 6, latents[0])
    steps = trained_steps(plan.scheduler)
    with torch.no_grad():  # the sampling log-probabilities recomputed under the same weights, bit for bit
        for i in steps:
            again = noisy_step(plan.scheduler, denoise(pipeline, denoiser(pipeline), latents[i], plan.timesteps[i],
                                                       cond, 7.5), i, latents[i], prev_sample=latents[i + 1])
            assert torch.equal(again.log_prob, log_probs[i]), i
    before = lora_b(pipeline)
    with restored(lora_params):
        stats = grpo_train(trainer, round, list(range(8)), steps)
        assert stats["clipped"] == 0 and abs(stats["adv_mean"]) < 1e-6 and abs(stats["adv_std"] - 1) < 1e-3
        assert torch.nn.utils.get_total_norm([p.grad for p in lora_params]) > 0 and stats["reward_std"] > 0
        torch.optim.AdamW(lora_params, lr=1e-3).step()
        after = lora_b(pipeline)
    assert all((after[n] - before[n]).abs().max() > 5e-4 for n in before)  # Adam's first step: lr where grad != 0


def test_a_grpo_update_raises_the_log_probability_of_the_high_advantage_trajectories(sampled):
    pipeline, lora_params, trainer, round = sampled
    latents, log_probs = round.latents, round.log_probs
    cond = conditioning(pipeline, round.prompts, 7.5, (16, 16))
    plan = schedule(pipeline, 6, latents[0])
    steps = trained_steps(plan.scheduler)
    advantages = group_advantages(round.total, 4)
    with restored(lora_params), torch.no_grad():
        with torch.enable_grad():
            grpo_train(trainer, round, list(range(8)), steps)
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
    trainer = one_process_trainer(pipeline, rewards, (32, 32), sampling_steps=4, guidance_scale=1.0, kl_beta=0.04)
    round = sample_round(trainer, PROMPTS, [(0,), (1,)], None)
    assert seen == [(False, False)] and not round.total.requires_grad and not any(x.requires_grad
                                                                                  for x in round.latents)
    stats = grpo_train(trainer, round, list(range(8)), [0, 2])
    assert all(p.grad is None for p in rewards.parameters())
    assert sum(p.grad.abs().sum() for p in lora_params) > 0 and stats["kl"] >= 0


def test_a_grpo_run_resumed_mid_round_ends_on_the_uninterrupted_lora_and_prompt_buffers(tiny_sd, files, tmp_path):
    # rounds of the 2 prompts, trained in 2 passes of minibatches of one prompt's group, each split into 2
    # micro-batches: 4 optimizer steps a round, so checkpoint-7 falls after the third update of the second round
    run = dict(TINY_GRPO, group_size=4, train_batch_size=1, sample_batch_size=2, num_inner_epochs=2,
               gradient_accumulation_steps=2, reward_norm="prompt", max_train_steps=14, checkpointing_steps=7)
    whole = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "whole"), **run)
    checkpoint = shutil.copytree(tmp_path / "whole" / "checkpoint-7", tmp_path / "resumed" / "checkpoint-7")
    assert json.load(open(checkpoint / "progress.json"))["round_updates"] == 3
    # the round's start (its LoRA) is kept as safetensors, read back without unpickling anything
    assert (checkpoint / "kept-0.safetensors").exists() and not list(checkpoint.glob("custom_checkpoint_*"))
    # the metrics.csv of a version that logged fewer columns: the resumed file gets them, empty in the old rows
    rows = pd.read_csv(tmp_path / "whole" / "metrics.csv")
    rows[rows.step <= 7].drop(columns=["grad_norm", "adv_std"]).to_csv(tmp_path / "resumed" / "metrics.csv",
                                                                        index=False)
    resumed = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "resumed"),
                       resume_from_checkpoint="latest", **run)
    expected, ours = load_file(whole), load_file(resumed)
    assert all(torch.equal(expected[k], ours[k]) for k in expected)
    logged = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert sorted(logged.columns) == sorted(rows.columns) and logged.step.tolist() == rows.step.tolist()
    assert logged.grad_norm.isna().tolist() == [step <= 7 for step in rows.step]
    assert torch.allclose(torch.tensor(logged.policy_loss.values), torch.tensor(rows.policy_loss.values), atol=1e-6,
                          equal_nan=True)
    # checkpoints of the versions before rounds are refused, naming what they trained: the last one saved grpo_steps
    # and no round flags; the first noisy-steps version saved no grpo_steps but logged policy_loss; the random-subset
    # ones neither
    for name, grpo_steps, columns in (("previous", NOISY_STEPS, rows.columns), ("first", None, rows.columns),
                                      ("older", None, [c for c in rows.columns if c != "policy_loss"])):
        old = shutil.copytree(tmp_path / "whole" / "checkpoint-7", tmp_path / name / "checkpoint-7")
        progress = json.load(open(old / "progress.json"))
        for flag in ("sample_batch_size", "num_inner_epochs", "grpo_steps"):
            del progress["run"][flag]
        progress["run"].update({"grpo_steps": grpo_steps} if grpo_steps else {})
        json.dump(progress, open(old / "progress.json", "w"))
        rows[rows.step <= 7][columns].to_csv(tmp_path / name / "metrics.csv", index=False)
    for name, what in (("previous", NOISY_STEPS), ("first", NOISY_STEPS),
                       ("older", "a seeded random subset of the steps")):
        with pytest.raises(InputError, match=re.escape(f"a checkpoint of another run (GRPO trained {what}")):
            finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / name),
                     resume_from_checkpoint="latest", **run)
    buffers = [json.load(open(tmp_path / name / "checkpoint-14" / "progress.json"))["prompt_stats"]
               for name in ("whole", "resumed")]
    assert buffers[0] == buffers[1] and len(buffers[0]["clip"]["buffers"]["a red circle"]) == 16


def test_grpo_on_two_processes_ends_on_the_lora_of_one_with_twice_the_batch(tiny_sd, files, tmp_path):
    # two passes over each round: the second step is off-policy on every process
    args = dict(TINY_GRPO, group_size=4, max_train_steps=2, checkpointing_steps=2, reward_norm="prompt",
                num_inner_epochs=2)
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
    (dict(sample_batch_size=3), "--sample_batch_size 3: a round of 3 prompts does not split into minibatches of "
                                "--train_batch_size 2"),
    (dict(sample_batch_size=0), r"--sample_batch_size must be at least 1 \(got 0\)"),
    (dict(num_inner_epochs=0), r"--num_inner_epochs must be at least 1 \(got 0\)"),
    (dict(gradient_accumulation_steps=3), "--gradient_accumulation_steps 3: a minibatch of --train_batch_size 2 x "
                                          "--group_size 8 = 16 images does not split into 3 micro-batches"),
    (dict(method="draft", sample_batch_size=4), "--sample_batch_size 4: a GRPO flag"),
    (dict(method="refl", num_inner_epochs=2), "--num_inner_epochs 2: a GRPO flag"),
])
def test_bad_grpo_flags_end_in_one_line_before_anything_loads(flags, expected, tiny_sd, files, tmp_path):
    with pytest.raises(InputError, match=expected):
        finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "run"),
                 **{**TINY_GRPO, "max_train_steps": 1, **flags})
    assert not os.path.exists(tmp_path / "run")


def test_grpo_takes_a_ddim_scheduler_with_set_alpha_to_one(tiny_sd, files, tmp_path):
    # its last step has no noise; GRPO trains only steps that inject noise and samples the others deterministically
    to_one = shutil.copytree(tiny_sd, tmp_path / "to-one")
    config = json.load(open(to_one / "scheduler" / "scheduler_config.json"))
    json.dump({**config, "set_alpha_to_one": True}, open(to_one / "scheduler" / "scheduler_config.json", "w"))
    final = finetune(str(to_one), files["prompts"], files["clip"], output_dir=str(tmp_path / "run"),
                     **{**TINY_GRPO, "max_train_steps": 1, "checkpointing_steps": 1})
    assert lora_b_moved(final) and pd.read_csv(tmp_path / "run" / "metrics.csv").grad_norm[1] > 0


def test_grpo_with_a_nonfinite_reward_ends_in_one_line(tiny_sd, files, tmp_path):
    weights = torch.load(files["init"], weights_only=True)
    weights["visual.proj"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(InputError, match="step 1: --scorer broken: a non-finite reward \\(nan\\) on the prompt '"):
        finetune(tiny_sd, files["prompts"], f"broken=clip:{tmp_path / 'nan.pth'},model={TINY_CLIP}",
                 output_dir=str(tmp_path / "b"), **{**TINY_GRPO, "max_train_steps": 1, "group_size": 2})


def test_a_nonfinite_reward_drops_every_step_of_its_round_and_a_nonfinite_loss_its_own(tiny_sd, files, tmp_path,
                                                                                       capsys, monkeypatch):
    """Rounds of 2 minibatches (2 steps); with --skip_nonfinite_loss the first round's nan reward drops steps 1 and
    2, a nan loss in step 3 drops step 3 alone, and step 4 is taken: 3 skipped steps, counted and logged empty."""
    from social_reward.reward.differentiable import Reward
    scores, real_score = [], Reward.score

    def score(self, images, prompts):
        scores.append(1)
        values = real_score(self, images, prompts)
        return values * float("nan") if len(scores) == 1 else values
    losses, real_loss = [], grpo.clipped_policy_loss

    def loss(*args):
        losses.append(1)
        value = real_loss(*args)
        return value * float("nan") if len(losses) == 1 else value
    monkeypatch.setattr(Reward, "score", score)
    monkeypatch.setattr(grpo, "clipped_policy_loss", loss)
    final = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "run"),
                     skip_nonfinite_loss=True, **{**TINY_GRPO, "train_batch_size": 1, "sample_batch_size": 2,
                                                  "max_train_steps": 4, "checkpointing_steps": 4})
    assert "skipped 3 steps with a non-finite loss" in capsys.readouterr().out
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics.loss.isna().tolist() == [True, True, True, True, False]  # row 0: the validation's
    assert metrics.grad_norm.isna().tolist() == [True, True, True, True, False] and lora_b_moved(final)
    assert len(scores) == 4  # two rounds, each scored a micro-batch (one prompt's group) at a time


def test_the_second_minibatch_of_a_round_is_off_policy_and_its_clipped_samples_get_no_gradient(tiny_sd, files,
                                                                                              tmp_path, monkeypatch):
    # a round of 2 prompts trained in 2 minibatches of one prompt's group (Flow-GRPO's 2 updates a round); at the tiny
    # pipeline's learning rate (2e-2) one step moves the ratios far past the clip range (1e-4)
    calls, real = [], grpo.clipped_policy_loss

    def recording(log_prob, old_log_prob, advantages, clip_range, *args):
        loss = real(log_prob, old_log_prob, advantages, clip_range, *args)
        grad, = torch.autograd.grad(loss, log_prob, retain_graph=True)  # each sample's share of the gradient
        calls.append((torch.exp(log_prob.detach() - old_log_prob), advantages.clamp(-5, 5), grad))
        return loss
    monkeypatch.setattr(grpo, "clipped_policy_loss", recording)
    finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "run"),
             **{**TINY_GRPO, "train_batch_size": 1, "sample_batch_size": 2, "max_train_steps": 2,
                "checkpointing_steps": 2})
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics.clipped[1] == 0 and metrics.clipped[2] > 0
    first, second = calls[:len(calls) // 2], calls[len(calls) // 2:]  # a call per trained step and minibatch
    assert all(torch.equal(ratio, torch.ones_like(ratio)) for ratio, _, _ in first)  # on-policy, bit for bit
    ratio, advantages, grad = (torch.cat(values) for values in zip(*second))
    assert (ratio != 1).all()
    # PPO's clip binds where the ratio has moved past 1 +- c the way the advantage pushes it: no gradient there
    binding = ((advantages > 0) & (ratio > 1 + 1e-4)) | ((advantages < 0) & (ratio < 1 - 1e-4))
    assert binding.any() and (grad[binding] == 0).all() and (grad[~binding] != 0).all()


def test_a_minibatch_in_micro_batches_ends_on_the_lora_of_it_whole_and_no_call_sees_more(tiny_sd, files, tmp_path,
                                                                                       monkeypatch):
    # a round of 2 prompts x a group of 8 in minibatches of one prompt's group: 8 images, in 2 micro-batches of 4;
    # sampling runs a micro-batch at a time too, so no denoiser call holds more than 4 latents (no guidance here)
    run = dict(TINY_GRPO, train_batch_size=1, sample_batch_size=2, max_train_steps=2, checkpointing_steps=2)
    whole = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "whole"), **run)
    seen, real = [], grpo.denoise
    monkeypatch.setattr(grpo, "denoise", lambda pipeline, model, x, *args: seen.append(
        (len(x), torch.is_grad_enabled())) or real(pipeline, model, x, *args))
    from social_reward.generators import sampling
    real_sampling = sampling.denoise
    monkeypatch.setattr(sampling, "denoise", lambda pipeline, model, x, *args: seen.append(
        (len(x), torch.is_grad_enabled())) or real_sampling(pipeline, model, x, *args))
    micro = finetune(tiny_sd, files["prompts"], files["clip"], output_dir=str(tmp_path / "micro"),
                     gradient_accumulation_steps=2, **run)
    assert {size for size, _ in seen} == {4} and {grad for _, grad in seen} == {True, False}
    expected, ours = load_file(whole), load_file(micro)
    for k in expected:  # Adam's first steps are +-lr wherever a gradient is nonzero: float rounding only
        assert torch.allclose(expected[k], ours[k], rtol=0, atol=1e-4), (k, (expected[k] - ours[k]).abs().max())
