"""Fine-tune a text-to-image pipeline through a reward: the work of scripts/finetune_generator.py (its --help
describes the methods and flags; docs/generators.md the rest). LoRA on the family's denoiser, one training loop for
every method: a method module (generators/draft.py, refl.py, grpo.py) yields each optimizer step's forward and
backward, and the loop clips, steps, logs, validates and checkpoints (checkpoint-STEP folders, resumable), then writes
diffusers' LoRA weights.

    finetune_generator("tiny-sd", "prompts.txt", ["clip:init.pth,model=assets/tiny-clip.json"], method="grpo",
                       sampling_steps=4, resolution=32, max_train_steps=10, output_dir="tiny_lora")
"""
import contextlib
import json
import os
import shutil
from types import SimpleNamespace

import torch
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm import tqdm

from social_reward.data.prompts import read_prompts
from social_reward.dist import make_accelerator
from social_reward.errors import InputError
from social_reward.generators import draft, grpo, refl
from social_reward.generators.families import check_pipeline_folder, check_size, default_size, denoiser, load_pipeline
from social_reward.generators.generate import take_aliases
from social_reward.generators.lora import LORA_WEIGHTS, add_lora, save_lora, set_lora_state_dict
from social_reward.generators.sampling import generate_images, to_pil
from social_reward.reward.mix import RewardMix
from social_reward.training.checkpoints import find_state, free_space, rotate, save_state_whole
from social_reward.training.flags import GRPO_INNER_EPOCHS, LEARNING_RATES, check_generator_flags, check_grpo_flags
from social_reward.training.guard import NonFiniteGuard
from social_reward.training.metrics import MetricsLog

METRICS = ("step", "loss", "reward", "val_reward")


METHODS = {"draft": draft, "refl": refl, "grpo": grpo}  # --method -> its module: METRICS, run_flags, prepare


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


def state_bytes(lora_params, optimizer, kept=()):
    """About the bytes a checkpoint writes: the LoRA tensors, the optimizer's state and the tensors of what a method
    keeps in checkpoints (`kept`: GRPO's round start, a copy of the LoRA)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
        return [t for v in values for t in tensors(v)]
    found = tensors(list(lora_params)) + tensors([state for state in optimizer.state.values()]) + tensors(
        [obj.state_dict() for obj in kept])
    return sum(t.numel() * t.element_size() for t in found)


def prompt_batches(accelerator, loader, progress, seed):
    """The training prompts, batch after batch from the position in progress (epoch, batches_done), epoch after epoch:
    each epoch's shuffle is seeded by its number and each prompt's noise keyed by (seed, epoch, the prompt's index), so
    a resume takes the same prompts and noise next, in any batching. Each batch: epoch, index, last (the epoch's last
    batch), prompts, keys."""
    epoch, skip = progress["epoch"], progress["batches_done"]
    while True:
        loader.set_epoch(epoch)
        for index, (indices, prompts) in enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader,
                                                   start=skip):
            yield SimpleNamespace(epoch=epoch, index=index, last=index == len(loader) - 1, prompts=prompts,
                                  keys=[("train", seed, epoch, i) for i in indices])
        epoch, skip = epoch + 1, 0


def make_trainer(accelerator, model, pipeline, rewards, lora_params, guard, flags, size, progress, loader):
    """What a method's prepare(trainer) works with: the run's objects and flags, its position (progress, and the
    prompt batches from it) and the loop's helpers: accumulate(sync), the context of a micro-batch's forward and
    backward (the processes' gradients averaged at the optimizer step's last micro-batch only: DDP's no_sync must
    hold the forward too); finite(value, step, prompts, reward_message), the non-finite guard on every process's
    value; average({name: number}), the means over the processes; gather, what --reward_norm prompt's buffers learn
    from; keep_in_checkpoints(obj): obj.state_dict() (lists of tensors, and JSON) saved in each checkpoint
    (kept_state), load_state_dict on resume (restore_kept)."""
    kept = []

    def finite(value, step, prompts, reward_message=None):
        values = accelerator.gather(value.detach().float().reshape(1))
        return guard.finite(values, f"step {step}", nonfinite_cause(values, prompts, reward_message))

    def average(values):
        means = accelerator.gather(torch.tensor([float(v) for v in values.values()], device=accelerator.device)[None])
        return dict(zip(values, means.mean(0).tolist()))

    def keep_in_checkpoints(obj):
        kept.append(obj)
    return SimpleNamespace(
        accelerator=accelerator, model=model, pipeline=pipeline, rewards=rewards, lora_params=lora_params,
        guard=guard, flags=flags, size=size, progress=progress, kept=kept, gather=every_process(accelerator),
        batches=prompt_batches(accelerator, loader, progress, flags.seed), finite=finite, average=average,
        keep_in_checkpoints=keep_in_checkpoints,
        accumulate=lambda sync: contextlib.nullcontext() if sync else accelerator.no_sync(model))


CHECKPOINT_PREFIX = "checkpoint-"  # diffusers' scripts' checkpoint-STEP folders


def kept_state(kept):
    """What a method keeps in checkpoints (GRPO's round start), in files read back without unpickling: each kept
    object's lists of tensors as kept-I.safetensors, the rest of its state_dict (JSON) for progress.json."""
    tensors, rest = {}, []
    for i, obj in enumerate(kept):
        state = obj.state_dict()
        lists = {k for k, v in state.items()
                 if isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v)}
        tensors[f"kept-{i}.safetensors"] = {f"{k}.{j}": t for k in lists for j, t in enumerate(state[k])}
        rest.append({k: v for k, v in state.items() if k not in lists})
    return tensors, rest


def restore_kept(kept, checkpoint, rest):
    """kept_state's files of `checkpoint` back into the kept objects (load_state_dict)."""
    from safetensors.torch import load_file
    for i, (obj, state) in enumerate(zip(kept, rest)):
        tensors = load_file(os.path.join(checkpoint, f"kept-{i}.safetensors"))
        lists = {}
        for key in sorted(tensors, key=lambda key: int(key.rpartition(".")[2])):
            lists.setdefault(key.rpartition(".")[0], []).append(tensors[key])
        obj.load_state_dict({**state, **lists})


def save_checkpoint(accelerator, output_dir, progress, nbytes, checkpoints_total_limit=None, kept=()):
    """output_dir/checkpoint-STEP: the LoRA weights (diffusers format), optimizer, scheduler and RNG states,
    progress.json and what the method keeps (kept_state), written under a temporary name and renamed when whole; a
    disk without room for it is refused before writing. With checkpoints_total_limit, the oldest beyond it are
    deleted once the new one is whole."""
    folder = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{progress['step']}")
    tensors, rest = kept_state(kept)
    save_state_whole(accelerator, folder, {**progress, "kept": rest}, nbytes, tensors)
    rotate(accelerator, folder, CHECKPOINT_PREFIX, checkpoints_total_limit)


def save_final_lora(accelerator, pipeline, model, output_dir):
    """output_dir/pytorch_lora_weights.safetensors, the file pipeline.load_lora_weights(output_dir) reads."""
    lora_params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    free_space(output_dir, sum(p.numel() * p.element_size() for p in lora_params), LORA_WEIGHTS)
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


# what GRPO's checkpoints of the version before rounds (2026-12-03) trained; before it, a seeded random subset of the
# steps; since, grpo.VERSION
NOISY_STEPS = "the noisy steps (grpo.trained_steps)"


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
            older = {NOISY_STEPS: f"{NOISY_STEPS}, one update a sampled batch"}.get(saved.get(flag), saved.get(flag))
            what = (f"GRPO trained {older} there, {run[flag]} here: start a new run" if flag == "grpo_steps"
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
                       sample_batch_size=None, num_inner_epochs=None, **aliases):
    """Fine-tune LoRA adapters of a pipeline folder of any supported family (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) to
    raise the reward of its images; writes checkpoint-STEP folders, metrics.csv, validation grids and
    output_dir/pytorch_lora_weights.safetensors (returned). Today's names (pretrained_model, save_folder,
    batch_size, save_every) are accepted for diffusers' ones. guidance_scale and resolution default to the
    pipeline's own (SDXL 5.0 at 1024 px, FLUX.1 3.5, ...); GRPO's sample_batch_size to train_batch_size (a round of
    one minibatch) and num_inner_epochs to flags.GRPO_INNER_EPOCHS.

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
    check_grpo_flags(method, group_size, clip_range, timestep_fraction, kl_beta, reward_norm, calibration,
                     sample_batch_size, num_inner_epochs, train_batch_size, gradient_accumulation_steps)
    accelerator = make_accelerator(gradient_accumulation_steps=gradient_accumulation_steps or 1,
                                   mixed_precision=mixed_precision, log_with=report_to, project_dir=output_dir,
                                   dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    # the count is the flag's or accelerate launch's, but the accumulation is the methods' own (a GRPO minibatch's
    # micro-batches are not the loader's batches): accelerate is set to 1, so it neither scales a loss nor skips a step
    if accelerator.gradient_accumulation_steps != (gradient_accumulation_steps or 1):
        gradient_accumulation_steps = accelerator.gradient_accumulation_steps
        check_grpo_flags(method, group_size, clip_range, timestep_fraction, kl_beta, reward_norm, calibration,
                         sample_batch_size, num_inner_epochs, train_batch_size, gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = 1
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # its engine steps the optimizer at each backward unless accelerate accumulates, which the methods do instead
        raise InputError("scripts/finetune_generator.py under DeepSpeed: not supported (the methods accumulate a "
                         "step's micro-batches themselves, and DeepSpeed would step at each); use DDP or FSDP")
    family = check_pipeline_folder(pretrained_model_name_or_path)
    guidance_scale = family.default_guidance if guidance_scale is None else guidance_scale
    scorers = parse_scorers(scorer if isinstance(scorer, (list, tuple)) else [scorer], reward_weights)
    train_prompts = read_prompts(prompts, "--prompts")
    val_prompts = read_prompts(validation_prompts, "--validation_prompts") if validation_prompts else []
    lora_alpha = rank if lora_alpha is None else lora_alpha
    learning_rate = LEARNING_RATES[method] if learning_rate is None else learning_rate
    # what the methods read (generators/draft.py, refl.py, grpo.py)
    flags = SimpleNamespace(
        sampling_steps=sampling_steps, grad_steps=grad_steps, guidance_scale=guidance_scale, seed=seed,
        train_batch_size=train_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        group_size=group_size, clip_range=clip_range, timestep_fraction=timestep_fraction, kl_beta=kl_beta,
        noise_level=noise_level, sample_batch_size=train_batch_size if sample_batch_size is None else sample_batch_size,
        num_inner_epochs=GRPO_INNER_EPOCHS if num_inner_epochs is None else num_inner_epochs)
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
           "calibration": calibration and os.path.abspath(calibration), **METHODS[method].run_flags(flags)}
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
    optimizer = torch.optim.AdamW(lora_params, lr=learning_rate)
    # as diffusers' scripts: the prepared scheduler steps once per process each optimizer step
    scheduler = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    # a batch of the loader: a GRPO round's prompts (sample_batch_size), else an optimizer step's micro-batch
    loader = DataLoader(list(enumerate(train_prompts)), batch_size=flags.sample_batch_size, shuffle=True,
                        collate_fn=lambda rows: ([i for i, _ in rows], [p for _, p in rows]))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    lora_hooks(accelerator, pipeline, model)
    guard = NonFiniteGuard(accelerator, output_dir, skip_nonfinite_loss)
    trainer = make_trainer(accelerator, model, pipeline, rewards, lora_params, guard, flags, size, progress, loader)
    updates = METHODS[method].prepare(trainer)  # checks what the method needs of the pipeline, before any writing
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    if checkpoint:
        accelerator.load_state(checkpoint)
        restore_kept(trainer.kept, checkpoint, progress.get("kept", []))
        rewards.load_prompt_state(progress.get("prompt_stats"))
        accelerator.print(f"resuming from {checkpoint}: step {progress['step']}")
    columns = METRICS + METHODS[method].METRICS + tuple(f"reward_{name}" for name in rewards.names)
    metrics = MetricsLog(accelerator, output_dir, columns, progress["step"] if checkpoint else None,
                         "social_reward_generator", report_to and {k: v for k, v in run.items() if not isinstance(v, list)})
    validate = validation(accelerator, pipeline, rewards, val_prompts, output_dir, size, sampling_steps,
                          guidance_scale, seed, validation_batch_size)
    if not checkpoint:
        metrics.log(step=0, val_reward=validate(0))

    bar = tqdm(total=max_train_steps, initial=progress["step"], disable=not accelerator.is_local_main_process)
    while progress["step"] < max_train_steps:
        step = progress["step"] + 1
        with accelerator.autocast():
            stats = next(updates)  # the method's forward and backward of this step; None: the guard dropped it
        grad_norm = None
        if stats is not None:
            if max_grad_norm and max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(lora_params, max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in lora_params if p.grad is not None])
            optimizer.step()
            scheduler.step()
        else:
            progress["skipped_steps"] += 1
        optimizer.zero_grad()
        progress["step"] = step
        done = step == max_train_steps
        val_reward = validate(step) if step % checkpointing_steps == 0 or done else None
        # (DeepSpeed's clip_grad_norm_ returns None: the column is then empty)
        row = {**(stats or {}), "grad_norm": None if grad_norm is None else float(grad_norm)}
        metrics.log(step=step, val_reward=val_reward, **row)
        bar.update(1)
        if stats is not None:
            bar.set_postfix(loss=f"{stats['loss']:.4f}", **{k: f"{v:.3g}" for k, v in row.items()
                                                            if k in METHODS[method].METRICS and v is not None})
        if step % checkpointing_steps == 0 or done:
            save_checkpoint(accelerator, output_dir, {**progress, "run": run, "order": order,
                                                      "prompt_stats": rewards.prompt_state()},
                            state_bytes(lora_params, optimizer, trainer.kept), checkpoints_total_limit, trainer.kept)
    if progress["skipped_steps"]:
        accelerator.print(f"skipped {progress['skipped_steps']} steps with a non-finite loss")
    final = save_final_lora(accelerator, pipeline, model, output_dir)
    accelerator.end_training()
    return final
