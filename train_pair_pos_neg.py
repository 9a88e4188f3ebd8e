"""Fine-tune CLIP on (prompt, preferred image, other image) triplets: the original's training script, its flags,
checkpoint names and notebook import unchanged.

    accelerate launch train_pair_pos_neg.py --training_file training_file.parquet \\
        --training_mode visual_upper_layers_textual_upper_layers --batch_size 32 --n_epochs 10 \\
        --save_folder ./clip_model --loss_name triplet

Devices, processes and --mixed_precision come from `accelerate launch` (or its config); gradient accumulation from
--gradient_accumulation_steps here, or from accelerate (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, a DeepSpeed config).
The work is social_reward.training.clip.finetune_model, which `from train_pair_pos_neg import finetune_model` (the
original's notebook import) still gives.
"""
import argparse

from social_reward.cli import add_model_flags, run_cli
from social_reward.models.training_modes import TRAINING_MODES
from social_reward.training.flags import DEFAULT_SHUFFLE_WINDOW, LOSSES, SAVE_FORMATS, SHUFFLES, TRUNK_CACHE_DTYPES


def __getattr__(name):
    """The original's notebook import, loaded when asked for: the script's --help needs no torch."""
    if name == "finetune_model":
        from social_reward.training.clip import finetune_model
        return finetune_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training_file", required=True, nargs="+",
                        help="pairs: a table with columns prompt, pos_path, neg_path; Pick-a-Pic parquet shards "
                             "(files, a glob or a folder); an HPD v2 train.json")
    parser.add_argument("--training_mode", default="all", choices=list(TRAINING_MODES))
    parser.add_argument("--batch_size", type=int, default=128, help="per process")
    parser.add_argument("--n_epochs", type=int, default=5)
    parser.add_argument("--save_folder", default="./clip_finetune")
    parser.add_argument("--loss_name", default="triplet", choices=list(LOSSES))
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    add_model_flags(parser)  # --model, --pretrained, --checkout_path (weights to start from), --num_workers
    parser.add_argument("--image_root", default=None,
                        help="the image folder of an HPD v2 or ImageReward json (default: beside the json)")
    parser.add_argument("--save_every", type=int, default=800, help="optimizer steps between checkpoints")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=None,
                        help="batches per optimizer step (default: accelerate's setting, else 1)")
    parser.add_argument("--validation_file", default=None, nargs="+",
                        help="pairs to measure accuracy on at each checkpoint (any layout --training_file takes)")
    parser.add_argument("--report_to", default=None, help="an accelerate tracker: tensorboard, wandb, mlflow, ...")
    parser.add_argument("--save_format", default="pth", choices=SAVE_FORMATS)
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="'latest' (in --save_folder) or a training_state_step_N folder")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip pairs whose images cannot be read")
    parser.add_argument("--skip_nonfinite_loss", action="store_true", help="skip steps whose loss is nan/inf")
    parser.add_argument("--trunk_cache", default=None, metavar="DIR",
                        help="compute the frozen part of each tower once per image and prompt, store it in DIR, and "
                             "read it back in every epoch and later run (partial training modes)")
    parser.add_argument("--trunk_cache_dtype", default="fp16", choices=list(TRUNK_CACHE_DTYPES),
                        help="how cache entries are stored (fp32: a run ends on the weights of the uncached run)")
    parser.add_argument("--shuffle", default=None, choices=list(SHUFFLES),
                        help="block: row groups in a shuffled order, pairs shuffled within a window of them, each row "
                             "group read once per epoch (the default for images in parquet, e.g. Pick-a-Pic shards); "
                             "uniform: every pair anywhere (the original's; the default for image files)")
    parser.add_argument("--shuffle_window", type=int, default=DEFAULT_SHUFFLE_WINDOW, metavar="W",
                        help="row groups whose pairs are shuffled together in the block order (memory holds W)")
    args = parser.parse_args()
    from social_reward.training.clip import finetune_model

    finetune_model(**vars(args))


if __name__ == "__main__":
    run_cli(main)
