"""Fine-tune CLIP on (prompt, preferred image, other image) triplets: the work of train_pair_pos_neg.py.

    finetune_model("training_file.parquet", "visual_upper_layers_textual_upper_layers", batch_size=32, n_epochs=10,
                   save_folder="./clip_model")

Devices, processes and --mixed_precision come from `accelerate launch` (or its config); gradient accumulation from
--gradient_accumulation_steps, or from accelerate (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, a DeepSpeed config).
"""
import json
import os

import pandas as pd
import torch
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from social_reward.data.order import pair_order
from social_reward.data.pairs import PromptImagePair, drop_unreadable_pairs, load_pairs
from social_reward.data.sources import read_source
from social_reward.devices import default_num_workers
from social_reward.dist import make_accelerator
from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from social_reward.models.clip import load_model
from social_reward.models.training_modes import make_optimizer, train_mode, trainable_parameters
from social_reward.models.weights import load_weights
from social_reward.scoring.encoding import pair_accuracy
from social_reward.training import losses as loss_classes
from social_reward.training.checkpoints import find_state, free_space, rotate, save_state_whole
from social_reward.training.flags import DEFAULT_SHUFFLE_WINDOW, LOSSES, check_clip_flags
from social_reward.training.guard import NonFiniteGuard
from social_reward.training.metrics import MetricsLog
from social_reward.training.trunk_cache import CachedTriplets, TowerHeads, TrunkCache, tower_splits

METRICS = ("epoch", "step", "loss", "learning_rate", "val_accuracy")
STATE_PREFIX = "training_state_step_"


def save_checkpoint(accelerator, model, save_folder, names, save_format="pth"):
    """Write the model's fp32 OpenAI-format state dict once under each name (later names are hard links).

    Every process takes part (FSDP/DeepSpeed gather the weights); only the main process writes.
    Each file appears whole or not at all: written to a temporary name, then renamed.
    """
    state_dict = accelerator.get_state_dict(model)
    free_space(save_folder, sum(v.numel() * (4 if v.is_floating_point() else v.element_size())
                                for v in state_dict.values()), f"{names[0]}.{save_format}")
    if accelerator.is_main_process:
        state_dict = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state_dict.items()}
        paths = [os.path.join(save_folder, f"{name}.{save_format}") for name in names]
        tmp = paths[0] + ".tmp"
        if save_format == "safetensors":
            from safetensors.torch import save_file
            save_file(state_dict, tmp)
        else:
            torch.save(state_dict, tmp)
        os.replace(tmp, paths[0])
        for path in paths[1:]:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            os.link(paths[0], path + ".tmp")  # the same bytes under the original's second name: no second file
            os.replace(path + ".tmp", path)
    accelerator.wait_for_everyone()


def save_training_state(accelerator, save_folder, progress, optimizer):
    """accelerate's save_state (optimizer, RNG; the weights are in progress["checkpoint"]) plus our position, into a
    folder renamed into place when whole; only the newest such folder is kept."""
    nbytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor))
    folder = os.path.join(save_folder, f"{STATE_PREFIX}{progress['step']}")
    save_state_whole(accelerator, folder, progress, nbytes)
    rotate(accelerator, folder, STATE_PREFIX, keep=1)


def start_position(state_dir, clip, save_folder, sharded):
    """The run's position (epoch, batches done, step, skipped steps): zero, or a training state's, whose checkpoint
    is then loaded into `clip` (before a trunk cache is keyed: a resumed run reads the entries of its frozen weights;
    sharded models get their weights from the state itself)."""
    if not state_dir:
        return {"epoch": 0, "batches_done": 0, "step": 0, "skipped_steps": 0}
    with open(os.path.join(state_dir, "progress.json")) as f:
        progress = json.load(f)
    if not sharded:
        load_weights(clip, os.path.join(save_folder, progress["checkpoint"]))
    return progress


def restore_state(accelerator, state_dir, progress, sharded):
    """accelerate's load_state (optimizer, RNG) from a training state, after prepare; the weights are not in the state
    folders of an unsharded model (they are the checkpoint of the same step), so saving leaves them out too."""
    if not sharded:
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    if state_dir:
        accelerator.load_state(state_dir)
        accelerator.print(f"resuming from {state_dir}: epoch {progress['epoch']}, step {progress['step']}")


def without_unreadable_pairs(accelerator, source, skip_bad_images):
    """The source, said what it left out; with skip_bad_images, without the pairs whose images do not read (named)."""
    if source.left_out:
        accelerator.print(source.left_out)
    if skip_bad_images:
        source, skipped = drop_unreadable_pairs(source)
        if skipped:
            accelerator.print(skipped)
    return source


def training_step(model, batch, loss_fn, accelerator, guard, where):
    """One micro-batch of the method: encode the prompt and both images (the model's forward normalizes), the loss
    over (prompt, preferred, other), backward (accelerate accumulates the gradient over a window). Returns the loss
    averaged over the processes, or None where it was not finite (guard: its window is dropped, or the run stops)."""
    rows, text, pos_images, neg_images = batch
    image_features, text_features, logit_scale = model(torch.cat([pos_images, neg_images]), text)
    pos_features, neg_features = image_features.float().chunk(2)
    extra = (logit_scale.float(),) if loss_fn.uses_logit_scale else ()
    loss = loss_fn(text_features.float(), pos_features, neg_features, *extra)
    all_losses = accelerator.gather(loss.detach()[None])
    if not guard.finite(all_losses, where, lambda: f"the loss is not finite ({all_losses.tolist()}) on the batch of "
                                                   f"rows {accelerator.gather(rows.to(accelerator.device)).tolist()}"):
        return None
    accelerator.backward(loss)
    return all_losses.mean()


def checkpoint_names(epoch, step, stepped, epoch_end, save_every):
    """The original's checkpoint names due after this batch: every save_every optimizer steps, and at each epoch end
    (also when its last step was skipped) under both clip_epoch_E_global_step_final and _step_N."""
    if epoch_end:
        return [f"clip_epoch_{epoch}_global_step_final", f"clip_epoch_{epoch}_global_step_{step}"]
    return [f"clip_epoch_{epoch}_global_step_{step}"] if stepped and step % save_every == 0 else []


def training_data(source, clip, preprocess, tokenizer, accelerator, batch_size, num_workers, fast_decode,
                  trunk_cache=None, trunk_cache_dtype="fp16"):
    """(the module a step calls, its dataset): the CLIP and decoded images; or, with a trunk cache, the trained heads
    and cached trunk outputs (the cache filled first, its one-line plan printed)."""
    if trunk_cache is None:
        return clip, PromptImagePair(source, preprocess, tokenizer, with_row=True, fast_decode=fast_decode)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise InputError("--trunk_cache runs the frozen trunk outside the model; it does not work with FSDP or "
                         "DeepSpeed sharding (use DDP, or leave out --trunk_cache)")
    pairs = source.pairs
    cache = TrunkCache(trunk_cache, clip, tower_splits(clip), preprocess, tokenizer,
                       pd.unique(pd.concat([pairs.pos_path, pairs.neg_path])), pd.unique(pairs.prompt),
                       fast_decode, trunk_cache_dtype, accelerator.mixed_precision)
    accelerator.print(cache.plan())
    with torch.random.fork_rng():  # filling draws no randomness from the run's: the same shuffles as without it
        cache.fill(accelerator, 2 * batch_size, num_workers)
    return TowerHeads(clip, cache.splits), CachedTriplets(pairs, cache)


def finetune_model(training_file, training_mode="all", batch_size=128, n_epochs=5, save_folder="./clip_finetune",
                   loss_name="triplet", checkout_path=None, learning_rate=3e-5, model=DEFAULT_MODEL,
                   pretrained=DEFAULT_PRETRAINED, num_workers=None, save_every=800, seed=42,
                   gradient_accumulation_steps=None, validation_file=None, report_to=None, save_format="pth",
                   resume_from_checkpoint=None, skip_bad_images=False, skip_nonfinite_loss=False, image_root=None,
                   fast_decode=False, trunk_cache=None, trunk_cache_dtype="fp16", shuffle=None,
                   shuffle_window=DEFAULT_SHUFFLE_WINDOW):
    """Fine-tune a CLIP on pairs and save checkpoints into `save_folder`; returns the path of the last one.

    `training_file` and `validation_file` are any source sources.read_source reads: a pair table (parquet or
    DataFrame), Pick-a-Pic parquet shards (a list, a glob or a folder), an HPD v2 or ImageReward json (images under
    `image_root`). Ties and unlabeled rows are left out. `trunk_cache`: a folder where the frozen part of each tower
    is computed once and read back in every epoch and later run (trunk_cache.py). `shuffle`: "block" (the default
    for images in parquet: row groups in a shuffled order, pairs shuffled within windows of `shuffle_window` row
    groups, each read once per epoch) or "uniform" (the original's; the default for image files); order.pair_order.

    Example (a notebook, one process):
        finetune_model("training_file.parquet", "visual_upper_layers", batch_size=32, n_epochs=1)
    """
    check_clip_flags(loss_name, training_mode, save_format, batch_size, n_epochs, save_every, num_workers,
                     gradient_accumulation_steps, trunk_cache_dtype, shuffle, shuffle_window)
    # a seeded sampler gives every process the same shuffle, so N processes see the batches one process would; a
    # launch whose processes would each run alone is refused here, before anything is read
    accelerator = make_accelerator(gradient_accumulation_steps=gradient_accumulation_steps or 1, log_with=report_to,
                                   project_dir=save_folder,
                                   dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    # the data is checked before the model loads: a typo costs seconds, not a ViT-L/14 load
    source = read_source(training_file, image_root, check_files=not skip_bad_images)
    validation_pairs = load_pairs(validation_file, image_root=image_root) if validation_file is not None else None
    state_dir = (find_state(resume_from_checkpoint, save_folder, STATE_PREFIX, f"{STATE_PREFIX}N folder")
                 if resume_from_checkpoint else None)
    set_seed(seed)
    num_workers = default_num_workers(accelerator.device) if num_workers is None else num_workers
    source = without_unreadable_pairs(accelerator, source, skip_bad_images)
    order = pair_order(source.pairs, shuffle, shuffle_window, seed, batch_size, accelerator.num_processes)
    loss_fn = getattr(loss_classes, LOSSES[loss_name])()
    clip, preprocess, tokenizer = load_model(model, pretrained, checkout_path)
    optimizer = make_optimizer(trainable_parameters(clip, training_mode, loss_fn.uses_logit_scale), training_mode,
                               learning_rate)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    progress = start_position(state_dir, clip, save_folder, sharded)
    train_mode(clip)
    step_model, dataset = training_data(source, clip.to(accelerator.device), preprocess, tokenizer, accelerator,
                                        batch_size, num_workers, fast_decode, trunk_cache, trunk_cache_dtype)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=order is None, sampler=order, num_workers=num_workers,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=num_workers > 0)
    # the model itself is prepared and called, so DDP synchronises gradients and autocast applies
    step_model, optimizer, loader = accelerator.prepare(step_model, optimizer, loader)
    if accelerator.is_main_process:
        os.makedirs(save_folder, exist_ok=True)
    restore_state(accelerator, state_dir, progress, sharded)
    metrics = MetricsLog(accelerator, save_folder, METRICS, progress["step"] if state_dir else None, "social_reward", report_to and {
        "training_mode": training_mode, "batch_size": batch_size, "n_epochs": n_epochs, "loss_name": loss_name,
        "learning_rate": learning_rate, "model": model, "num_processes": accelerator.num_processes})
    validate = validation(accelerator, step_model, preprocess, tokenizer, validation_pairs, num_workers, fast_decode)
    guard = NonFiniteGuard(accelerator, save_folder, skip_nonfinite_loss)

    for epoch in range(progress["epoch"], n_epochs):
        loader.set_epoch(epoch)  # the epoch's shuffle, the same after a resume
        skip = progress["batches_done"] if epoch == progress["epoch"] else 0
        progress["epoch"] = epoch
        bar = tqdm(accelerator.skip_first_batches(loader, skip) if skip else loader, desc=f"epoch {epoch}",
                   initial=skip, total=len(loader), disable=not accelerator.is_local_main_process)
        losses = []  # the losses of the current optimizer step's batches (several with gradient accumulation)
        for batch_index, batch in enumerate(bar, start=skip):
            with accelerator.accumulate(step_model):
                loss = training_step(step_model, batch, loss_fn, accelerator, guard,
                                     f"step {progress['step'] + 1} (epoch {epoch})")
            losses += [] if loss is None else [loss]
            epoch_end = batch_index + 1 == len(loader)
            if not accelerator.sync_gradients:
                continue
            stepped = guard.end_window()  # a window with a non-finite micro-batch reaches no optimizer step
            if stepped:
                optimizer.step()
            else:
                progress["skipped_steps"] += 1
                losses = []
            optimizer.zero_grad()
            if not (stepped or epoch_end):
                continue
            progress.update(step=progress["step"] + stepped, epoch=epoch, batches_done=batch_index + 1)
            names = checkpoint_names(epoch, progress["step"], stepped, epoch_end, save_every)
            val_accuracy = validate(progress["step"]) if names else None
            if stepped:
                step_loss, losses = torch.stack(losses).mean().item(), []
                bar.set_postfix(loss=f"{step_loss:.4f}", step=progress["step"])
                metrics.log(epoch=epoch, step=progress["step"], loss=step_loss,
                            learning_rate=optimizer.param_groups[0]["lr"], val_accuracy=val_accuracy)
            if names:
                save_checkpoint(accelerator, step_model, save_folder, names, save_format)
                save_training_state(accelerator, save_folder, {**progress, "epoch": epoch + epoch_end,
                                                               "batches_done": 0 if epoch_end else batch_index + 1,
                                                               "checkpoint": f"{names[0]}.{save_format}"},
                                    optimizer)
    if progress["skipped_steps"]:
        accelerator.print(f"skipped {progress['skipped_steps']} steps with a non-finite loss")
    accelerator.end_training()
    return os.path.join(save_folder, f"clip_epoch_{n_epochs - 1}_global_step_final.{save_format}")


def validation(accelerator, step_model, preprocess, tokenizer, validation_pairs, num_workers, fast_decode):
    """validate(step): the accuracy on validation_pairs (None without them); every process encodes a share of the
    images and prompts (encoding.across_processes), the main process prints."""
    def validate(step):
        if validation_pairs is None:
            return None
        clip = accelerator.unwrap_model(step_model)
        clip = clip.clip if isinstance(clip, TowerHeads) else clip
        accuracy = pair_accuracy(clip.eval(), preprocess, tokenizer, validation_pairs, accelerator.device,
                                 num_workers=num_workers, progress=False, fast_decode=fast_decode)
        train_mode(clip)
        if accelerator.is_main_process:
            tqdm.write(f"step {step}: validation Accuracy: {accuracy * 100:.2f}%")
        return accuracy
    return validate
