"""What the two trainers' flags may say, checked before anything is read or loaded: the vocabularies their parsers
offer and the checks both share. It imports nothing heavy, so a command's --help and a mistake in its flags answer
at once; the modules that act on a flag read its vocabulary from here.

    check_clip_flags(loss_name="triplet", training_mode="all", batch_size=0, ...)   # InputError: --batch_size ...
"""
from social_reward.errors import InputError
from social_reward.models.training_modes import TRAINING_MODES
from social_reward.reward.normalization import reward_norm_for

# ---- the CLIP trainer (train_pair_pos_neg.py) -----------------------------------------------------------------------

LOSSES = {"triplet": "TripletLoss", "pairwise": "PairwiseLoss"}  # --loss_name: a class of training/losses.py
SAVE_FORMATS = ("pth", "safetensors")
TRUNK_CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --trunk_cache_dtype: torch's name
SHUFFLES = ("block", "uniform")  # data/order.py's epoch orders; unset: block for images in parquet, else uniform
# row groups: a batch of 128 then draws from about 9 of Pick-a-Pic's row groups of 100, and a loading process holds
# about 270 MB of its images (benchmarks/shard_order.py, docs/data.md)
DEFAULT_SHUFFLE_WINDOW = 8

# ---- the generator trainer (scripts/finetune_generator.py) ----------------------------------------------------------

METHODS = ("draft", "refl", "grpo")
# --learning_rate by method: diffusers' LoRA scripts' 1e-4; GRPO's score-function gradient is far noisier than
# DRaFT's or ReFL's (docs/generators.md), and DDPO and Flow-GRPO train it at 3e-4
LEARNING_RATES = {"draft": 1e-4, "refl": 1e-4, "grpo": 3e-4}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# GRPO's passes over a sampled round (--num_inner_epochs): DDPO's and Flow-GRPO's each sample once (docs/generators.md)
GRPO_INNER_EPOCHS = 1


def check_choice(flag, value, choices):
    if value not in choices:
        raise InputError(f"--{flag} {value}: unknown; choose from {', '.join(c for c in choices if c is not None)}")


def check_at_least(flag, value, least):
    if value < least:
        raise InputError(f"--{flag} must be at least {least} (got {value})")


def check_clip_flags(loss_name, training_mode, save_format, batch_size, n_epochs, save_every, num_workers,
                     gradient_accumulation_steps, trunk_cache_dtype, shuffle=None, shuffle_window=DEFAULT_SHUFFLE_WINDOW):
    for flag, value, choices in (("loss_name", loss_name, LOSSES), ("training_mode", training_mode, TRAINING_MODES),
                                 ("save_format", save_format, SAVE_FORMATS),
                                 ("trunk_cache_dtype", trunk_cache_dtype, TRUNK_CACHE_DTYPES),
                                 ("shuffle", shuffle, (None, *SHUFFLES))):
        check_choice(flag, value, choices)
    for flag, value, least in (("batch_size", batch_size, 1), ("n_epochs", n_epochs, 1), ("save_every", save_every, 1),
                               ("num_workers", 0 if num_workers is None else num_workers, 0),
                               ("gradient_accumulation_steps", gradient_accumulation_steps or 1, 1),
                               ("shuffle_window", shuffle_window, 1)):
        check_at_least(flag, value, least)


def check_generator_flags(method, sampling_steps, grad_steps, rank, train_batch_size, max_train_steps,
                          checkpointing_steps, gradient_accumulation_steps, checkpoints_total_limit=None,
                          lr_scheduler="constant", lr_warmup_steps=0):
    check_choice("method", method, METHODS)
    for flag, value in (("sampling_steps", sampling_steps), ("grad_steps", grad_steps), ("rank", rank),
                        ("train_batch_size", train_batch_size), ("max_train_steps", max_train_steps),
                        ("checkpointing_steps", checkpointing_steps),
                        ("gradient_accumulation_steps", gradient_accumulation_steps or 1),
                        ("checkpoints_total_limit", checkpoints_total_limit or 1)):
        check_at_least(flag, value, 1)
    check_at_least("lr_warmup_steps", lr_warmup_steps, 0)
    if method == "draft" and grad_steps > sampling_steps:
        raise InputError(f"--grad_steps {grad_steps} is more than --sampling_steps {sampling_steps}: DRaFT-K takes "
                         f"gradient through the last K of the sampling steps")
    check_choice("lr_scheduler", lr_scheduler, LR_SCHEDULERS)


def check_grpo_flags(method, group_size, clip_range, timestep_fraction, kl_beta, reward_norm, calibration,
                     sample_batch_size=None, num_inner_epochs=None, train_batch_size=1,
                     gradient_accumulation_steps=None):
    reward_norm_for(reward_norm, calibration)
    if method != "grpo":
        if reward_norm == "group":
            raise InputError(f"--reward_norm group: --method {method} samples each prompt once, so each group would "
                             f"be one image; use it with --method grpo, or --reward_norm prompt")
        for flag, value in (("sample_batch_size", sample_batch_size), ("num_inner_epochs", num_inner_epochs)):
            if value is not None:
                raise InputError(f"--{flag} {value}: a GRPO flag (its rounds); --method {method} trains on each "
                                 f"batch as it samples it")
        return
    if group_size < 2:
        raise InputError(f"--group_size {group_size}: must be at least 2 (advantages compare the images of a prompt)")
    if not 0 < timestep_fraction <= 1:
        raise InputError(f"--timestep_fraction {timestep_fraction}: must be in (0, 1]")
    if not clip_range > 0 or kl_beta < 0:
        raise InputError(f"--clip_range {clip_range} must be above 0 and --kl_beta {kl_beta} at least 0")
    for flag, value in (("sample_batch_size", sample_batch_size), ("num_inner_epochs", num_inner_epochs)):
        check_at_least(flag, 1 if value is None else value, 1)  # unset: a round of one minibatch, the default passes
    if (sample_batch_size or train_batch_size) % train_batch_size:
        raise InputError(f"--sample_batch_size {sample_batch_size}: a round of {sample_batch_size} prompts does not "
                         f"split into minibatches of --train_batch_size {train_batch_size}; make it a multiple")
    images, micro_batches = train_batch_size * group_size, gradient_accumulation_steps or 1
    if images % micro_batches:
        raise InputError(f"--gradient_accumulation_steps {micro_batches}: a minibatch of --train_batch_size "
                         f"{train_batch_size} x --group_size {group_size} = {images} images does not split into "
                         f"{micro_batches} micro-batches; make it a divisor of {images}")
