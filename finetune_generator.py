"""Fine-tune a Stable Diffusion pipeline through a reward: LoRA on the UNet, gradient from the reward of its own images.

    accelerate launch finetune_generator.py --pretrained_model stable-diffusion-2-1-base/ \\
        --prompts prompts.txt --validation_prompts val_prompts.txt \\
        --scorer ours=clip:clip_epoch_4_global_step_final.pth --save_folder ./sd_lora

Methods (--method):
  draft  DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): sample with DDIM
         in --sampling_steps steps, the last --grad_steps K of them with gradient, decode, loss = -reward.
  refl   ReFL (Xu et al. 2023, ImageReward's ReFL.py): sample without gradient up to a step drawn from the last quarter
         (ReFL's 30-39 of 40), predict the clean image from it in one step with gradient, decode,
         loss = relu(2 - reward) * 1e-3.
The result is diffusers LoRA weights: `pipeline.load_lora_weights(save_folder)`. Devices, processes and
--mixed_precision come from `accelerate launch` (or the flag here); --batch_size is per process.
"""
import argparse
import glob
import json
import os
import random
import shutil

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm import tqdm

from clip_model import InputError, check_free_space, run_cli
from generators import (LORA_WEIGHTS, add_lora, check_pipeline_folder, decode, generate_images, load_pipeline,
                        lora_state_dict, noise_seed, read_prompts, sample_latents, set_lora_state_dict, start_noise,
                        text_embeddings, to_pil)
from run_state import MetricsLog, save_state_whole

METHODS = ("draft", "refl")
METRICS = ("step", "loss", "reward", "val_reward")
REFL_MARGIN, REFL_GRAD_SCALE = 2.0, 1e-3  # ReFL.py: loss = relu(2 - reward).mean() * grad_scale (1e-3)


def parse_scorers(named_specs, reward_weights=None):
    """[NAME=]KIND:PATH[,key=value] strings -> [(name, spec, weight)], checked (scorers.parse_named_scorers) before any
    model loads; a spec without a name is named by its kind."""
    from scorers import parse_named_scorers
    named = [spec if "=" in spec and ":" not in spec.partition("=")[0] else f"{spec.partition(':')[0]}={spec}"
             for spec in named_specs]
    scorers = parse_named_scorers(named)
    weights = reward_weights or [1.0] * len(scorers)
    if len(weights) != len(scorers):
        raise InputError(f"--reward_weights: {len(weights)} weights for {len(scorers)} --scorer")
    return [(name, spec, float(w)) for (name, spec), w in zip(scorers.items(), weights)]


def check_flags(method, sampling_steps, grad_steps, rank, resolution, batch_size, max_train_steps, save_every,
                gradient_accumulation_steps):
    if method not in METHODS:
        raise InputError(f"--method {method}: unknown; choose from {', '.join(METHODS)}")
    for flag, value in (("sampling_steps", sampling_steps), ("grad_steps", grad_steps), ("rank", rank),
                        ("batch_size", batch_size), ("max_train_steps", max_train_steps), ("save_every", save_every),
                        ("gradient_accumulation_steps", gradient_accumulation_steps or 1)):
        if value < 1:
            raise InputError(f"--{flag} must be at least 1 (got {value})")
    if method == "draft" and grad_steps > sampling_steps:
        raise InputError(f"--grad_steps {grad_steps} is more than --sampling_steps {sampling_steps}: DRaFT-K takes "
                         f"gradient through the last K of the sampling steps")
    if resolution < 8 or resolution % 8:
        raise InputError(f"--resolution {resolution}: must be a multiple of 8")


class Rewards(torch.nn.Module):
    """The weighted sum of the scorers' rewards (reward.py) of images in [0, 1]; a reward that fails on the
    generator's images ends in one line naming it."""

    def __init__(self, scorers, device, gradient_checkpointing=False):
        super().__init__()
        from reward import Reward
        self.names = [name for name, _, _ in scorers]
        self.weights = [weight for _, _, weight in scorers]
        self.rewards = torch.nn.ModuleList(Reward.load(spec, device, gradient_checkpointing=gradient_checkpointing)
                                           for _, spec, _ in scorers)

    def forward(self, images, prompts):
        total = 0.0
        for name, weight, reward in zip(self.names, self.weights, self.rewards):
            try:
                total = total + weight * reward(images, prompts).float()
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                raise InputError(f"--scorer {name}: fails on the generator's images ({tuple(images.shape)}, "
                                 f"{images.dtype}): {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
        return total


def method_loss(method, unet, pipeline, rewards, prompts, noise, sampling_steps, grad_steps, guidance_scale, stop_at):
    """(loss, rewards) of one batch: sample from `noise` with the method's gradient path, decode, score."""
    embeddings = text_embeddings(pipeline, prompts, guidance_scale)
    latents = sample_latents(unet, pipeline.scheduler, noise, embeddings, sampling_steps, guidance_scale,
                             grad_steps if method == "draft" else 0, stop_at if method == "refl" else None)
    reward = rewards(decode(pipeline.vae, latents), prompts)
    if method == "draft":
        return -reward.mean(), reward
    return torch.relu(REFL_MARGIN - reward).mean() * REFL_GRAD_SCALE, reward


def nonfinite_guard(accelerator, save_folder, skip_nonfinite_loss):
    """The check after each forward pass, as the trainer's: a non-finite loss on any process stops the run naming the
    step and the prompts, or with skip_nonfinite_loss is reported and its step skipped."""
    def loss_is_finite(all_losses, step, prompts):
        if torch.isfinite(all_losses).all():
            return True
        if not skip_nonfinite_loss:
            raise InputError(f"step {step}: the loss is not finite ({all_losses.tolist()}) on the prompts {prompts}; "
                             f"the last checkpoint in {save_folder} is intact (--skip_nonfinite_loss skips such steps)")
        accelerator.print(f"skipped a step with a non-finite loss, prompts {prompts}")
        return False
    return loss_is_finite


def refl_stop(sampling_steps, seed, step):
    """ReFL's stop step, drawn per optimizer step (the same on every process) from the last quarter of the steps."""
    late = max(1, sampling_steps // 4)
    return random.Random(noise_seed("refl", seed, step)).randrange(sampling_steps - late, sampling_steps)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def lora_hooks(accelerator, unet):
    """accelerate's save_state/load_state hooks: the UNet's LoRA, as diffusers LoRA weights, instead of the whole UNet."""
    from diffusers import StableDiffusionPipeline

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=lora_state_dict(
                accelerator.unwrap_model(unet)), safe_serialization=True)
        weights.clear()

    def load(models, input_dir):
        set_lora_state_dict(accelerator.unwrap_model(unet), input_dir)
        models.clear()
    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def state_bytes(lora_params, optimizer):
    """About the bytes a checkpoint writes: the LoRA tensors and the optimizer's state."""
    tensors = [p for p in lora_params] + [v for state in optimizer.state.values() for v in state.values()
                                          if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def save_checkpoint(accelerator, save_folder, progress, nbytes):
    """save_folder/checkpoint-STEP: the LoRA weights (diffusers format), optimizer and RNG states and progress.json,
    written under a temporary name and renamed when whole; a disk without room for it is refused before writing."""
    final = os.path.join(save_folder, f"checkpoint-{progress['step']}")
    check_free_space(save_folder, nbytes, f"checkpoint-{progress['step']}")
    save_state_whole(accelerator, final, progress)
    accelerator.wait_for_everyone()


def save_final_lora(accelerator, unet, save_folder):
    """save_folder/pytorch_lora_weights.safetensors, the file pipeline.load_lora_weights(save_folder) reads."""
    from diffusers import StableDiffusionPipeline
    state = lora_state_dict(accelerator.unwrap_model(unet))
    check_free_space(save_folder, sum(t.numel() * t.element_size() for t in state.values()), LORA_WEIGHTS)
    if accelerator.is_main_process:
        tmp = os.path.join(save_folder, "final.tmp")
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)
        os.replace(os.path.join(tmp, LORA_WEIGHTS), os.path.join(save_folder, LORA_WEIGHTS))
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    return os.path.join(save_folder, LORA_WEIGHTS)


def find_checkpoint(resume_from_checkpoint, save_folder, run):
    """The checkpoint to resume from (the path given, or for "latest" the newest whole one in save_folder) and its
    progress; a checkpoint of a run with other flags is refused, naming the first that differs."""
    if resume_from_checkpoint == "latest":
        found = [p for p in glob.glob(os.path.join(save_folder, "checkpoint-*")) if not p.endswith(".tmp")]
        if not found:
            raise InputError(f"--resume_from_checkpoint latest: no checkpoint-STEP folder in {save_folder}")
        resume_from_checkpoint = max(found, key=lambda p: int(p.rsplit("-", 1)[1]))
    path = os.path.join(resume_from_checkpoint, "progress.json")
    if not os.path.isfile(path):
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: not a checkpoint of this script "
                         f"(a checkpoint-STEP folder with progress.json)")
    with open(path) as f:
        progress = json.load(f)
    for flag in run:
        if progress.get("run", {}).get(flag) != run[flag]:
            raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: a checkpoint of another run "
                             f"(--{flag} {progress.get('run', {}).get(flag)} there, {run[flag]} here)")
    return resume_from_checkpoint, progress


# ---- metrics and validation ----------------------------------------------------------------------------------------

def validation(accelerator, pipeline, rewards, validation_prompts, save_folder, resolution, sampling_steps,
               guidance_scale, seed):
    """validate(step): the mean reward of the validation prompts' images (each from the noise generate.py gives
    sample 0 of its prompt at this seed), measured on the main process, the images saved as validation-STEP.png."""
    def validate(step):
        if not validation_prompts:
            return None
        value = None
        if accelerator.is_main_process:
            keys = [(seed, prompt, 0) for prompt in validation_prompts]
            with accelerator.autocast():
                images = generate_images(pipeline, validation_prompts, keys, resolution, sampling_steps,
                                         guidance_scale)
                with torch.no_grad():
                    value = rewards(images.to(accelerator.device), validation_prompts).mean().item()
            grid = make_grid(images, nrow=min(len(images), 8), padding=2, pad_value=1.0)
            to_pil(grid[None])[0].save(os.path.join(save_folder, f"validation-{step}.png"))
            tqdm.write(f"step {step}: validation reward {value:.5f}")
        accelerator.wait_for_everyone()
        return value
    return validate


def finetune_generator(pretrained_model, prompts, scorer, reward_weights=None, method="draft", sampling_steps=50,
                       grad_steps=1, guidance_scale=7.5, resolution=512, batch_size=1, learning_rate=1e-4,
                       max_train_steps=1000, rank=4, lora_alpha=None, save_folder="./generator_lora", save_every=100,
                       validation_prompts=None, seed=42, gradient_accumulation_steps=None,
                       gradient_checkpointing=False, mixed_precision=None, resume_from_checkpoint=None,
                       skip_nonfinite_loss=False, report_to=None):
    """Fine-tune LoRA adapters of a Stable Diffusion pipeline folder to raise the reward of its images; writes
    checkpoint-STEP folders, metrics.csv, validation grids and save_folder/pytorch_lora_weights.safetensors (returned).

    Example (a notebook, one process, the tiny pipeline of the tests):
        finetune_generator("tiny-sd", "prompts.txt", ["clip:init.pth,model=assets/tiny-clip.json"],
                           sampling_steps=4, resolution=32, max_train_steps=10, save_folder="tiny_lora")
    """
    check_flags(method, sampling_steps, grad_steps, rank, resolution, batch_size, max_train_steps, save_every,
                gradient_accumulation_steps)
    check_pipeline_folder(pretrained_model)
    scorers = parse_scorers(scorer if isinstance(scorer, (list, tuple)) else [scorer], reward_weights)
    train_prompts = read_prompts(prompts, "--prompts")
    val_prompts = read_prompts(validation_prompts, "--validation_prompts") if validation_prompts else []
    lora_alpha = rank if lora_alpha is None else lora_alpha
    # the flags that make a run what it is: a checkpoint resumes only a run with the same ones
    run = {"pretrained_model": os.path.abspath(pretrained_model), "prompts": prompts,
           "scorer": [s for _, s, _ in scorers], "reward_weights": [w for _, _, w in scorers], "method": method,
           "sampling_steps": sampling_steps, "grad_steps": grad_steps, "guidance_scale": guidance_scale,
           "resolution": resolution, "rank": rank, "lora_alpha": lora_alpha, "batch_size": batch_size,
           "learning_rate": learning_rate, "seed": seed}
    run = json.loads(json.dumps(run))  # as progress.json holds it (lists, not tuples)
    checkpoint, progress = (find_checkpoint(resume_from_checkpoint, save_folder, run) if resume_from_checkpoint
                            else (None, {"step": 0, "epoch": 0, "batches_done": 0, "skipped_steps": 0}))

    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps or 1,
                              mixed_precision=mixed_precision, log_with=report_to, project_dir=save_folder,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    set_seed(seed)
    # frozen weights in the autocast precision, as diffusers' LoRA script keeps them; the LoRA tensors in fp32
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    pipeline = load_pipeline(pretrained_model, accelerator.device, weight_dtype)
    if resolution % pipeline.vae_scale_factor:
        raise InputError(f"--resolution {resolution}: must be a multiple of the VAE's {pipeline.vae_scale_factor}")
    unet = pipeline.unet
    lora_params = add_lora(unet, rank, lora_alpha)
    for param in lora_params:
        param.data = param.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        pipeline.vae.enable_gradient_checkpointing()
    rewards = Rewards(scorers, accelerator.device, gradient_checkpointing)
    optimizer = torch.optim.AdamW(lora_params, lr=learning_rate)
    loader = DataLoader(list(enumerate(train_prompts)), batch_size=batch_size, shuffle=True,
                        collate_fn=lambda rows: ([i for i, _ in rows], [p for _, p in rows]))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    lora_hooks(accelerator, unet)
    if accelerator.is_main_process:
        os.makedirs(save_folder, exist_ok=True)
    if checkpoint:
        accelerator.load_state(checkpoint)
        accelerator.print(f"resuming from {checkpoint}: step {progress['step']}")
    metrics = MetricsLog(accelerator, save_folder, METRICS, progress["step"] if checkpoint else None,
                         "social_reward_generator", report_to and {k: v for k, v in run.items() if not isinstance(v, list)})
    validate = validation(accelerator, pipeline, rewards, val_prompts, save_folder, resolution, sampling_steps,
                          guidance_scale, seed)
    if not checkpoint:
        metrics.log(step=0, val_reward=validate(0))

    loss_is_finite = nonfinite_guard(accelerator, save_folder, skip_nonfinite_loss)
    bar = tqdm(total=max_train_steps, initial=progress["step"], disable=not accelerator.is_local_main_process)
    losses, batch_rewards, window_ok = [], [], True
    while progress["step"] < max_train_steps:
        loader.set_epoch(progress["epoch"])  # the epoch's shuffle, the same after a resume
        skip = progress["batches_done"]
        for batch_index, (indices, prompts_batch) in enumerate(
                accelerator.skip_first_batches(loader, skip) if skip else loader, start=skip):
            step = progress["step"] + 1
            with accelerator.accumulate(unet), accelerator.autocast():
                # each prompt's noise is keyed by the run's seed, the epoch and the prompt: the same in any batching
                noise = start_noise(pipeline, [("train", seed, progress["epoch"], i) for i in indices], resolution,
                                    accelerator.device)
                loss, reward = method_loss(method, unet, pipeline, rewards, prompts_batch, noise, sampling_steps,
                                           grad_steps, guidance_scale, refl_stop(sampling_steps, seed, step))
                all_losses = accelerator.gather(loss.detach()[None])
                if loss_is_finite(all_losses, step, prompts_batch):
                    accelerator.backward(loss)
                    losses.append(all_losses.mean())
                    batch_rewards.append(accelerator.gather(reward.detach()).mean())
                else:  # the step is skipped: its whole accumulation window
                    window_ok = False
            if not accelerator.sync_gradients:
                continue
            if window_ok:
                optimizer.step()
            else:
                progress["skipped_steps"] += 1
            optimizer.zero_grad()
            progress.update(step=step, batches_done=batch_index + 1)
            done = step == max_train_steps
            val_reward = validate(step) if step % save_every == 0 or done else None
            metrics.log(step=step, loss=torch.stack(losses).mean().item() if window_ok else None,
                        reward=torch.stack(batch_rewards).mean().item() if window_ok else None, val_reward=val_reward)
            bar.update(1)
            if window_ok:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}")
            losses, batch_rewards, window_ok = [], [], True
            if step % save_every == 0 or done:
                save_checkpoint(accelerator, save_folder, {**progress, "run": run}, state_bytes(lora_params, optimizer))
            if done:
                break
        else:
            progress.update(epoch=progress["epoch"] + 1, batches_done=0)
    if progress["skipped_steps"]:
        accelerator.print(f"skipped {progress['skipped_steps']} steps with a non-finite loss")
    final = save_final_lora(accelerator, unet, save_folder)
    accelerator.end_training()
    return final


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model", required=True, help="a Stable Diffusion pipeline folder (save_pretrained)")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="prompts to train on: a text file (one a line), a json list, or a pair source (its prompts)")
    parser.add_argument("--scorer", action="append", required=True, help="[NAME=]KIND:PATH[,key=value], repeatable")
    parser.add_argument("--reward_weights", type=float, nargs="+", default=None, help="one per --scorer (default 1 each)")
    parser.add_argument("--method", default="draft", choices=METHODS)
    parser.add_argument("--sampling_steps", type=int, default=50)
    parser.add_argument("--grad_steps", type=int, default=1, help="DRaFT-K: the last K sampling steps with gradient")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (1: none)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1, help="prompts per process and batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--save_folder", default="./generator_lora")
    parser.add_argument("--save_every", type=int, default=100, help="optimizer steps between checkpoints and validation")
    parser.add_argument("--validation_prompts", default=None, nargs="+",
                        help="prompts whose images are scored (a fixed noise each) and saved at every checkpoint")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="of the UNet, the VAE decoder and the reward")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                        help="default: accelerate launch's")
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' (in --save_folder) or a checkpoint-STEP folder")
    parser.add_argument("--skip_nonfinite_loss", action="store_true", help="skip steps whose loss is nan/inf")
    parser.add_argument("--report_to", default=None, help="an accelerate tracker: tensorboard, wandb, ...")
    args = parser.parse_args()
    finetune_generator(**vars(args))


if __name__ == "__main__":
    run_cli(main)
