"""Fine-tune CLIP on (prompt, preferred image, other image) triplets.

    accelerate launch train_pair_pos_neg.py --training_file training_file.parquet \\
        --training_mode visual_upper_layers_textual_upper_layers --batch_size 32 --n_epochs 10 \\
        --save_folder ./clip_model --loss_name triplet

Devices, processes and --mixed_precision come from `accelerate launch` (or its config); gradient accumulation from
--gradient_accumulation_steps here, or from accelerate (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, a DeepSpeed config).
"""
import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip_model import (DEFAULT_MODEL, DEFAULT_PRETRAINED, TRAINING_MODES, InputError, default_num_workers, load_model,
                        make_optimizer, run_cli, trainable_parameters)
from data_set import PromptImagePair, load_pairs
from losses import TripletLoss

LOSSES = {"triplet": TripletLoss}


def save_checkpoint(accelerator, model, save_folder, *names):
    """Write the model's fp32 OpenAI-format state dict once under each name (later names are hard links).

    Every process takes part (FSDP/DeepSpeed gather the weights); only the main process writes.
    Each file appears whole or not at all: written to a temporary name, then renamed.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        first = os.path.join(save_folder, names[0])
        tmp = first + ".tmp"
        torch.save(state_dict, tmp)
        os.replace(tmp, first)
        for name in names[1:]:
            tmp = os.path.join(save_folder, name + ".tmp")
            if os.path.exists(tmp):
                os.remove(tmp)
            try:
                os.link(first, tmp)  # the same bytes under the original's second name, without a second 1.7 GB file
            except OSError:
                torch.save(state_dict, tmp)
            os.replace(tmp, os.path.join(save_folder, name))
    accelerator.wait_for_everyone()


def finetune_model(training_file, training_mode="all", batch_size=128, n_epochs=5, save_folder="./clip_finetune",
                   loss_name="triplet", checkout_path=None, learning_rate=3e-5, model=DEFAULT_MODEL,
                   pretrained=DEFAULT_PRETRAINED, num_workers=None, save_every=800, seed=42,
                   gradient_accumulation_steps=None):
    """Fine-tune a CLIP on a pair table and save checkpoints into `save_folder`; returns the path of the last one.

    Example (a notebook, one process):
        finetune_model("training_file.parquet", "visual_upper_layers", batch_size=32, n_epochs=1)
    """
    num_workers = default_num_workers() if num_workers is None else num_workers
    if loss_name not in LOSSES:
        raise InputError(f"--loss_name {loss_name}: unknown; choose from {', '.join(LOSSES)}")
    if training_mode not in TRAINING_MODES:
        raise InputError(f"--training_mode {training_mode}: unknown; choose from {', '.join(TRAINING_MODES)}")
    for flag, value, least in (("batch_size", batch_size, 1), ("n_epochs", n_epochs, 1), ("save_every", save_every, 1),
                               ("num_workers", num_workers, 0), ("gradient_accumulation_steps", gradient_accumulation_steps or 1, 1)):
        if value < least:
            raise InputError(f"--{flag} must be at least {least} (got {value})")
    pairs = load_pairs(training_file)  # before the model: a typo costs seconds, not a ViT-L/14 load

    # a seeded sampler gives every process the same shuffle, so N processes see the batches one process would
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps or 1,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(seed)
    clip, preprocess, tokenizer = load_model(model, pretrained, checkout_path)
    optimizer = make_optimizer(trainable_parameters(clip, training_mode), training_mode, learning_rate)
    loader = DataLoader(PromptImagePair(pairs, preprocess, tokenizer), batch_size=batch_size, shuffle=True,
                        num_workers=num_workers, pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=num_workers > 0)
    # the model itself is prepared and called, so DDP synchronises gradients and autocast applies
    clip, optimizer, loader = accelerator.prepare(clip, optimizer, loader)
    loss_fn = LOSSES[loss_name]()
    if accelerator.is_main_process:
        os.makedirs(save_folder, exist_ok=True)

    clip.train()
    step = 0
    for epoch in range(n_epochs):
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process)
        for text, pos_images, neg_images in bar:
            with accelerator.accumulate(clip):
                image_features, text_features, _ = clip(torch.cat([pos_images, neg_images]), text)
                pos_features, neg_features = image_features.float().chunk(2)
                loss = loss_fn(text_features.float(), pos_features, neg_features)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                bar.set_postfix(loss=f"{loss.item():.4f}", step=step)
                if step % save_every == 0:
                    save_checkpoint(accelerator, clip, save_folder, f"clip_epoch_{epoch}_global_step_{step}.pth")
        save_checkpoint(accelerator, clip, save_folder, f"clip_epoch_{epoch}_global_step_final.pth",
                        f"clip_epoch_{epoch}_global_step_{step}.pth")
    accelerator.end_training()
    return os.path.join(save_folder, f"clip_epoch_{n_epochs - 1}_global_step_final.pth")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training_file", required=True, help="pairs: columns prompt, pos_path, neg_path")
    parser.add_argument("--training_mode", default="all", choices=list(TRAINING_MODES))
    parser.add_argument("--batch_size", type=int, default=128, help="per process")
    parser.add_argument("--n_epochs", type=int, default=5)
    parser.add_argument("--save_folder", default="./clip_finetune")
    parser.add_argument("--loss_name", default="triplet", choices=list(LOSSES))
    parser.add_argument("--checkout_path", default=None, help="weights to start from (OpenAI-format state dict)")
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or model-config .json")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip weights tag, weights file, or none")
    parser.add_argument("--num_workers", type=int, default=default_num_workers(), help="DataLoader workers per process")
    parser.add_argument("--save_every", type=int, default=800, help="optimizer steps between checkpoints")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=None,
                        help="batches per optimizer step (default: accelerate's setting, else 1)")
    args = parser.parse_args()
    finetune_model(args.training_file, args.training_mode, args.batch_size, args.n_epochs, args.save_folder,
                   args.loss_name, args.checkout_path, args.learning_rate, args.model, args.pretrained,
                   args.num_workers, args.save_every, args.seed, args.gradient_accumulation_steps)


if __name__ == "__main__":
    run_cli(main)
