"""Fine-tune a text-to-image pipeline through a reward: LoRA on its denoiser, gradient from the reward of its own
images. Families: SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 (generators/families.py); flags named as diffusers' LoRA scripts'.

    accelerate launch scripts/finetune_generator.py --pretrained_model_name_or_path stable-diffusion-xl-base-1.0/ \
        --prompts prompts.txt --validation_prompts val_prompts.txt \
        --scorer ours=clip:clip_epoch_4_global_step_final.pth --output_dir ./sdxl_lora

Methods (--method):
  draft  DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): sample
         (DDIM, or the flow-matching Euler step for SD3/FLUX) in --sampling_steps steps, the last --grad_steps K of
         them with gradient, decode, loss = -reward.
  refl   ReFL (Xu et al. 2023, ImageReward's ReFL.py): sample without gradient up to a step drawn from the last quarter
         (ReFL's 30-39 of 40), predict the clean image from it in one step with gradient, decode,
         loss = relu(2 - reward) * 1e-3 for imagereward: scorers, -reward * 1e-3 for any other (docs/generators.md).
  grpo   GRPO (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025): --group_size images a prompt sampled with noise
         injected (DDIM eta > 0, or the flow sampler's SDE) at the trained steps (grpo.trained_steps: the first
         --timestep_fraction of the steps that inject noise; the near-deterministic last ones, and any left out,
         take the deterministic step), scored without gradient; advantages standardised within each group; a
         clipped importance-ratio loss over the trained steps, plus --kl_beta times the KL to the base (the LoRA
         switched off). metrics.csv and the progress bar show its diagnostics (GRPO_METRICS).
Each scorer is normalised by --reward_norm (none, group, prompt, calibrated: reward/normalization.py) before --reward_weights
combine them.
The result is diffusers LoRA weights, alpha in their metadata: `pipeline.load_lora_weights(output_dir)`. Devices,
processes and --mixed_precision come from `accelerate launch` (or the flag here); --train_batch_size is per process.
"""
import json
import os
import shutil

import torch
from accelerate.utils import DataLoaderConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm import tqdm

from social_reward.data.prompts import read_prompts
from social_reward.dist import make_accelerator
from social_reward.errors import InputError
from social_reward.generators.draft import method_loss
from social_reward.generators.families import check_pipeline_folder, check_size, default_size, denoiser, load_pipeline
from social_reward.generators.generate import take_aliases
from social_reward.generators.grpo import check_noisy_sampler, grpo_sample, grpo_train, trained_steps
from social_reward.generators.lora import LORA_WEIGHTS, add_lora, save_lora, set_lora_state_dict
from social_reward.generators.refl import refl_stop
from social_reward.generators.sampling import generate_images, schedule, start_noise, to_pil
from social_reward.reward.mix import RewardMix
from social_reward.training.checkpoints import find_state, free_space, rotate, save_state_whole
from social_reward.training.flags import LEARNING_RATES, check_generator_flags, check_grpo_flags
from social_reward.training.guard import NonFiniteGuard
from social_reward.training.metrics import MetricsLog

METRICS = ("step", "loss", "reward", "val_reward")


# GRPO's diagnostics, per optimizer step: the clipped surrogate alone, the KL to the base, the share of ratios
# clipped, the advantages' mean and spread (after the clamp), the mean within-group std of the total reward (the
# signal the advantages standardise) and the LoRA gradient's norm before clipping
GRPO_METRICS = ("policy_loss", "kl", "clipped", "adv_mean", "adv_std", "reward_std", "grad_norm")


REFL_MARGIN, REFL_GRAD_SCALE = 2.0, 1e-3  # ReFL.py: loss = relu(2 - reward).mean() * grad_scale (1e-3)


def parse_scorers(named_specs, reward_weights=None):
    """[NAME=]KIND:PATH[,key=value] strings -> [(name, spec, weight)], checked (scorers.parse_named_scorers) before any
    model loads; a spec without a name is named by its kind."""
    from social_reward.scorers.registry import parse_named_scorers
    named = [spec if "=" in spec and ":" not in spec.partition("=")[0] else f"{spec.partition(':')[0]}={spec}"
             for spec in named_specs]
    scorers = parse_named_scorers(named)
    weights = reward_weights or [1.0] * len(scorers)
    if len(weights) != len(scorers):
        raise InputError(f"--reward_weights: {len(weights)} weights for {len(scorers)} --scorer")
    return [(name, spec, float(w)) for (name, spec), w in zip(scorers.items(), weights)]


def nonfinite_cause(all_losses, prompts, reward_message):
    """cause() for the guard: a scorer's non-finite reward, named on whichever process met it, else the loss and the
    batch's prompts."""
    from accelerate.utils import gather_object

    def cause():
        found = [m for m in gather_object([reward_message]) if m]
        return found[0] if found else f"the loss is not finite ({all_losses.tolist()}) on the prompts {prompts}"
    return cause


def every_process(accelerator):
    """gather(values, prompts) -> every process's values and prompts, in process order: what the prompt buffers of
    --reward_norm prompt learn from, the same on every process."""
    from accelerate.utils import gather_object

    def gather(values, prompts):
        if accelerator.num_processes == 1:
            return values, prompts
        return accelerator.gather(values.detach().contiguous()), gather_object(list(prompts))
    return gather


def lora_hooks(accelerator, pipeline, model):
    """accelerate's save_state/load_state hooks: the denoiser's LoRA, as the family's LoRA weights with their adapter
    metadata, instead of the whole denoiser."""
    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(pipeline, output_dir, accelerator.unwrap_model(model))
        weights.clear()

    def load(models, input_dir):
        set_lora_state_dict(pipeline, input_dir, accelerator.unwrap_model(model))
        models.clear()
    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def state_bytes(lora_params, optimizer):
    """About the bytes a checkpoint writes: the LoRA tensors and the optimizer's state."""
    tensors = [p for p in lora_params] + [v for state in optimizer.state.values() for v in state.values()
                                          if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


CHECKPOINT_PREFIX = "checkpoint-"  # diffusers' scripts' checkpoint-STEP folders


def save_checkpoint(accelerator, output_dir, progress, nbytes, checkpoints_total_limit=None):
    """output_dir/checkpoint-STEP: the LoRA weights (diffusers format), optimizer, scheduler and RNG states and
    progress.json, written under a temporary name and renamed when whole; a disk without room for it is refused
    before writing. With checkpoints_total_limit, the oldest beyond it are deleted once the new one is whole."""
    folder = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{progress['step']}")
    save_state_whole(accelerator, folder, progress, nbytes)
    rotate(accelerator, output_dir, CHECKPOINT_PREFIX, checkpoints_total_limit)


def save_final_lora(accelerator, pipeline, model, output_dir):
    """output_dir/pytorch_lora_weights.safetensors, the file pipeline.load_lora_weights(output_dir) reads."""
    lora_params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    free_space(accelerator, output_dir, sum(p.numel() * p.element_size() for p in lora_params), LORA_WEIGHTS)
    if accelerator.is_main_process:
        tmp = os.path.join(output_dir, "final.tmp")
        save_lora(pipeline, tmp, accelerator.unwrap_model(model))
        os.replace(os.path.join(tmp, LORA_WEIGHTS), os.path.join(output_dir, LORA_WEIGHTS))
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    return os.path.join(output_dir, LORA_WEIGHTS)


def check_data_order(checkpoint, progress, order):
    """A resume with another process count, accumulation or precision would take other prompts next (or other
    arithmetic): refused in one line naming what differs."""
    saved = progress.get("order", {})
    for key, value in order.items():
        if key in saved and saved[key] != value:
            raise InputError(f"--resume_from_checkpoint {checkpoint}: saved with {key} {saved[key]}, resumed with "
                             f"{value}: the prompts that come next would differ; resume with {key} {saved[key]}")


# flags newer than some checkpoints: what those ran
RUN_DEFAULTS = {"reward_norm": "none", "calibration": None}


NOISY_STEPS = "the noisy steps (grpo.trained_steps)"  # what GRPO trains on; before 2026-12-03, a seeded random subset


def find_checkpoint(resume_from_checkpoint, save_folder, run):
    """The checkpoint to resume from (the path given, or for "latest" the newest whole one in save_folder) and its
    progress; a checkpoint of a run with other flags is refused, naming the first that differs."""
    resume_from_checkpoint = find_state(resume_from_checkpoint, save_folder, CHECKPOINT_PREFIX, "checkpoint-STEP folder")
    with open(os.path.join(resume_from_checkpoint, "progress.json")) as f:
        progress = json.load(f)
    saved = {**RUN_DEFAULTS, **progress.get("run", {})}  # a checkpoint from before a flag existed ran its default
    if saved.get("method") == "grpo" and "grpo_steps" not in saved:
        # the first version to train the noisy steps saved no grpo_steps, but it logged policy_loss, which the
        # random-subset versions before it did not
        try:
            with open(os.path.join(os.path.dirname(os.path.abspath(resume_from_checkpoint)), "metrics.csv")) as f:
                header = f.readline().strip().split(",")
        except OSError:
            header = []
        saved["grpo_steps"] = NOISY_STEPS if "policy_loss" in header else "a seeded random subset of the steps"
    for flag in run:
        if saved.get(flag) != run[flag]:
            what = (f"GRPO trained {saved.get(flag)} there, {run[flag]} here: start a new run" if flag == "grpo_steps"
                    else f"--{flag} {saved.get(flag)} there, {run[flag]} here")
            raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: a checkpoint of another run "
                             f"({what})")
    return resume_from_checkpoint, progress


def validation(accelerator, pipeline, rewards, validation_prompts, output_dir, size, sampling_steps, guidance_scale,
               seed, batch_size=8):
    """validate(step): the mean reward of the validation prompts' images (each from the noise generate.py gives
    sample 0 of its prompt at this seed), each process making and scoring its share in batches of `batch_size`; the
    main process gathers the rewards (the mean is one process's) and saves the images as validation-STEP.png."""
    from accelerate.utils import gather_object

    def validate(step):
        if not validation_prompts:
            return None
        with accelerator.split_between_processes(list(range(len(validation_prompts)))) as share:
            prompts = [validation_prompts[i] for i in share]
            mine = []
            if prompts:
                with accelerator.autocast(), torch.no_grad():
                    images = generate_images(pipeline, prompts, [(seed, p, 0) for p in prompts], size, sampling_steps,
                                             guidance_scale, batch_size)
                    values = torch.cat([rewards.validation_reward(images[i:i + batch_size].to(accelerator.device),
                                                                  prompts[i:i + batch_size]).float().cpu()
                                        for i in range(0, len(prompts), batch_size)])
                mine = [(i, v, image) for i, v, image in zip(share, values.tolist(), images)]
        rows = sorted(gather_object(mine), key=lambda row: row[0])
        value = sum(v for _, v, _ in rows) / len(rows)
        if accelerator.is_main_process:
            grid = make_grid(torch.stack([image for _, _, image in rows]), nrow=min(len(rows), 8), padding=2,
                             pad_value=1.0)
            to_pil(grid[None])[0].save(os.path.join(output_dir, f"validation-{step}.png"))
            tqdm.write(f"step {step}: validation reward {value:.5f}")
        accelerator.wait_for_everyone()
        return value
    return validate


ALIASES = {"pretrained_model": "pretrained_model_name_or_path", "save_folder": "output_dir",
           "batch_size": "train_batch_size", "save_every": "checkpointing_steps"}  # today's names, kept working


def finetune_generator(pretrained_model_name_or_path=None, prompts=None, scorer=None, reward_weights=None,
                       method="draft", sampling_steps=50, grad_steps=1, guidance_scale=None, resolution=None,
                       height=None, width=None, train_batch_size=1, learning_rate=None, lr_scheduler="constant",
                       lr_warmup_steps=0, max_grad_norm=1.0, max_train_steps=1000, rank=4, lora_alpha=None,
                       output_dir="./generator_lora", checkpointing_steps=100, checkpoints_total_limit=None,
                       validation_prompts=None, validation_batch_size=8, seed=42, gradient_accumulation_steps=None,
                       gradient_checkpointing=False, mixed_precision=None, resume_from_checkpoint=None,
                       skip_nonfinite_loss=False, report_to=None, group_size=8, clip_range=1e-4,
                       timestep_fraction=1.0, kl_beta=0.0, noise_level=None, reward_norm="none", calibration=None,
                       **aliases):
    """Fine-tune LoRA adapters of a pipeline folder of any supported family (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) to
    raise the reward of its images; writes checkpoint-STEP folders, metrics.csv, validation grids and
    output_dir/pytorch_lora_weights.safetensors (returned). Today's names (pretrained_model, save_folder,
    batch_size, save_every) are accepted for diffusers' ones. guidance_scale and resolution default to the
    pipeline's own (SDXL 5.0 at 1024 px, FLUX.1 3.5, ...).

    Example (a notebook, one process, the tiny pipeline of the tests):
        finetune_generator("tiny-sd", "prompts.txt", ["clip:init.pth,model=assets/tiny-clip.json"],
                           sampling_steps=4, resolution=32, max_train_steps=10, output_dir="tiny_lora")
    """
    pretrained_model_name_or_path, output_dir, train_batch_size, checkpointing_steps = take_aliases(
        "finetune_generator", aliases, ALIASES, dict(pretrained_model_name_or_path=pretrained_model_name_or_path,
                                                     output_dir=output_dir, train_batch_size=train_batch_size,
                                                     checkpointing_steps=checkpointing_steps))
    check_generator_flags(method, sampling_steps, grad_steps, rank, train_batch_size, max_train_steps,
                          checkpointing_steps, gradient_accumulation_steps, checkpoints_total_limit, lr_scheduler,
                          lr_warmup_steps)
    check_grpo_flags(method, group_size, clip_range, timestep_fraction, kl_beta, reward_norm, calibration)
    # a launch whose processes would each run alone is refused here, before anything is read
    accelerator = make_accelerator(gradient_accumulation_steps=gradient_accumulation_steps or 1,
                                   mixed_precision=mixed_precision, log_with=report_to, project_dir=output_dir,
                                   dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                             data_seed=seed))
    family = check_pipeline_folder(pretrained_model_name_or_path)
    guidance_scale = family.default_guidance if guidance_scale is None else guidance_scale
    scorers = parse_scorers(scorer if isinstance(scorer, (list, tuple)) else [scorer], reward_weights)
    train_prompts = read_prompts(prompts, "--prompts")
    val_prompts = read_prompts(validation_prompts, "--validation_prompts") if validation_prompts else []
    lora_alpha = rank if lora_alpha is None else lora_alpha
    learning_rate = LEARNING_RATES[method] if learning_rate is None else learning_rate
    set_seed(seed)
    # frozen weights in the autocast precision, as diffusers' LoRA script keeps them; the LoRA tensors in fp32
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    pipeline = load_pipeline(pretrained_model_name_or_path, accelerator.device, weight_dtype)
    if resolution is not None and (height or width):
        raise InputError("--resolution with --height/--width: give one or the other")
    size = check_size(pipeline, resolution) if resolution is not None else check_size(
        pipeline, (height or default_size(pipeline)[0], width or default_size(pipeline)[1]))
    # the flags that make a run what it is: a checkpoint resumes only a run with the same ones
    run = {"pretrained_model": os.path.abspath(pretrained_model_name_or_path), "prompts": prompts,
           "scorer": [s for _, s, _ in scorers], "reward_weights": [w for _, _, w in scorers], "method": method,
           "sampling_steps": sampling_steps, "grad_steps": grad_steps, "guidance_scale": guidance_scale,
           "resolution": size[0] if size[0] == size[1] else list(size), "rank": rank, "lora_alpha": lora_alpha,
           "batch_size": train_batch_size, "learning_rate": learning_rate, "seed": seed, "reward_norm": reward_norm,
           "calibration": calibration and os.path.abspath(calibration)}
    if method == "grpo":
        run.update(group_size=group_size, clip_range=clip_range, timestep_fraction=timestep_fraction,
                   kl_beta=kl_beta, noise_level=noise_level, grpo_steps=NOISY_STEPS)
    run = json.loads(json.dumps(run))  # as progress.json holds it (lists, not tuples)
    # what decides which prompts come next, and the arithmetic: a resume must keep them
    order = {"num_processes": accelerator.num_processes,
             "gradient_accumulation_steps": gradient_accumulation_steps or 1,
             "mixed_precision": accelerator.mixed_precision}
    checkpoint, progress = (find_checkpoint(resume_from_checkpoint, output_dir, run) if resume_from_checkpoint
                            else (None, {"step": 0, "epoch": 0, "batches_done": 0, "skipped_steps": 0}))
    if checkpoint:
        check_data_order(checkpoint, progress, order)
    model = denoiser(pipeline)
    lora_params = add_lora(pipeline, rank, lora_alpha)
    for param in lora_params:
        param.data = param.data.float()
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
        pipeline.vae.enable_gradient_checkpointing()
    rewards = RewardMix.load(scorers, accelerator.device, reward_norm, calibration, gradient_checkpointing)
    if method == "grpo":
        sampler = schedule(pipeline, sampling_steps, start_noise(pipeline, [()], size)).scheduler
        check_noisy_sampler(sampler, noise_level)
        grpo_steps = trained_steps(sampler, timestep_fraction, noise_level)
    optimizer = torch.optim.AdamW(lora_params, lr=learning_rate)
    # as diffusers' scripts: the prepared scheduler steps once per process each optimizer step
    scheduler = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    loader = DataLoader(list(enumerate(train_prompts)), batch_size=train_batch_size, shuffle=True,
                        collate_fn=lambda rows: ([i for i, _ in rows], [p for _, p in rows]))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    lora_hooks(accelerator, pipeline, model)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    if checkpoint:
        accelerator.load_state(checkpoint)
        rewards.load_prompt_state(progress.get("prompt_stats"))
        accelerator.print(f"resuming from {checkpoint}: step {progress['step']}")
    columns = METRICS + (GRPO_METRICS if method == "grpo" else ()) + tuple(f"reward_{name}" for name in rewards.names)
    metrics = MetricsLog(accelerator, output_dir, columns, progress["step"] if checkpoint else None,
                         "social_reward_generator", report_to and {k: v for k, v in run.items() if not isinstance(v, list)})
    validate = validation(accelerator, pipeline, rewards, val_prompts, output_dir, size, sampling_steps,
                          guidance_scale, seed, validation_batch_size)
    if not checkpoint:
        metrics.log(step=0, val_reward=validate(0))

    guard = NonFiniteGuard(accelerator, output_dir, skip_nonfinite_loss)
    bar = tqdm(total=max_train_steps, initial=progress["step"], disable=not accelerator.is_local_main_process)
    losses, batch_rewards, extra = [], [], []
    gather = every_process(accelerator)
    while progress["step"] < max_train_steps:
        loader.set_epoch(progress["epoch"])  # the epoch's shuffle, the same after a resume
        skip = progress["batches_done"]
        for batch_index, (indices, prompts_batch) in enumerate(
                accelerator.skip_first_batches(loader, skip) if skip else loader, start=skip):
            step = progress["step"] + 1
            with accelerator.accumulate(model), accelerator.autocast():
                # each prompt's noise is keyed by the run's seed, the epoch and the prompt: the same in any batching
                keys = [("train", seed, progress["epoch"], i) for i in indices]
                if method == "grpo":
                    group_prompts, cond, latents, log_probs, raw, reward = grpo_sample(
                        model, pipeline, rewards, prompts_batch, keys, group_size, sampling_steps, guidance_scale,
                        size, noise_level, gather, grpo_steps)
                    all_rewards = accelerator.gather(reward.sum()[None])
                    finite = guard.finite(all_rewards, f"step {step}", nonfinite_cause(
                        all_rewards, prompts_batch, rewards.nonfinite_message(raw, group_prompts)))
                    if finite:
                        stats = grpo_train(accelerator, model, pipeline, cond, latents, log_probs, reward, group_size,
                                           sampling_steps, guidance_scale, noise_level, grpo_steps, clip_range,
                                           kl_beta)
                        loss = torch.tensor(stats["loss"], device=accelerator.device)
                        extra.append(accelerator.gather(torch.tensor([stats[k] for k in GRPO_METRICS[:-1]],
                                                                     device=accelerator.device)[None]).mean(0))
                else:
                    loss, reward, raw = method_loss(method, model, pipeline, rewards, prompts_batch,
                                                    start_noise(pipeline, keys, size, accelerator.device),
                                                    sampling_steps, grad_steps, guidance_scale,
                                                    refl_stop(sampling_steps, seed, step), size, gather)
                    all_losses = accelerator.gather(loss.detach()[None])
                    finite = guard.finite(all_losses, f"step {step}", nonfinite_cause(
                        all_losses, prompts_batch, rewards.nonfinite_message(raw, prompts_batch)))
                    if finite:
                        accelerator.backward(loss)
                if finite:
                    losses.append(accelerator.gather(loss.detach()[None]).mean())
                    batch_rewards.append(torch.cat([accelerator.gather(v.detach()[None].float()).mean()[None]
                                                    for v in [reward.mean()] + [raw[n].mean() for n in rewards.names]]))
            if not accelerator.sync_gradients:
                continue
            grad_norm = None
            window_ok = guard.end_window()  # a window with a non-finite micro-batch reaches no optimizer step
            if window_ok:
                if max_grad_norm and max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(lora_params, max_grad_norm)
                elif method == "grpo":
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in lora_params if p.grad is not None])
                optimizer.step()
                scheduler.step()
            else:
                progress["skipped_steps"] += 1
            optimizer.zero_grad()
            progress.update(step=step, batches_done=batch_index + 1)
            done = step == max_train_steps
            val_reward = validate(step) if step % checkpointing_steps == 0 or done else None
            means = torch.stack(batch_rewards).mean(0).tolist() if window_ok else [None] * (1 + len(rewards.names))
            # (DeepSpeed's clip_grad_norm_ returns None: the column is then empty)
            grpo_means = dict(zip(GRPO_METRICS, torch.stack(extra).mean(0).tolist() + [
                None if grad_norm is None else float(grad_norm)])) if window_ok and extra else {}
            metrics.log(step=step, loss=torch.stack(losses).mean().item() if window_ok else None, reward=means[0],
                        val_reward=val_reward, **grpo_means,
                        **{f"reward_{name}": value for name, value in zip(rewards.names, means[1:])})
            bar.update(1)
            if window_ok:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}", **{k: f"{v:.3g}" for k, v in grpo_means.items()
                                                                     if v is not None})
            losses, batch_rewards, extra = [], [], []
            if step % checkpointing_steps == 0 or done:
                save_checkpoint(accelerator, output_dir, {**progress, "run": run, "order": order,
                                                          "prompt_stats": rewards.prompt_state()},
                                state_bytes(lora_params, optimizer), checkpoints_total_limit)
            if done:
                break
        else:
            progress.update(epoch=progress["epoch"] + 1, batches_done=0)
    if progress["skipped_steps"]:
        accelerator.print(f"skipped {progress['skipped_steps']} steps with a non-finite loss")
    final = save_final_lora(accelerator, pipeline, model, output_dir)
    accelerator.end_training()
    return final
