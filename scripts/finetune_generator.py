"""Fine-tune a text-to-image pipeline through a reward: LoRA on its denoiser, gradient from the reward of its own
images. Families: SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 (social_reward/generators/families.py); flags named as diffusers'
LoRA scripts'.

    accelerate launch scripts/finetune_generator.py --pretrained_model_name_or_path stable-diffusion-xl-base-1.0/ \\
        --prompts prompts.txt --validation_prompts val_prompts.txt \\
        --scorer ours=clip:clip_epoch_4_global_step_final.pth --output_dir ./sdxl_lora

Methods (--method):
  draft  DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): sample
         (DDIM, or the flow-matching Euler step for SD3/FLUX) in --sampling_steps steps, the last --grad_steps K of
         them with gradient, decode, loss = -reward.
  refl   ReFL (Xu et al. 2023, ImageReward's ReFL.py): sample without gradient up to a step drawn from the last quarter
         (ReFL's 30-39 of 40), predict the clean image from it in one step with gradient, decode,
         loss = relu(2 - reward) * 1e-3 for imagereward: scorers, -reward * 1e-3 for any other (docs/generators.md).
  grpo   GRPO (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025) in rounds: --sample_batch_size prompts x
         --group_size images sampled with noise injected (DDIM eta > 0, or the flow sampler's SDE) at the trained
         steps (grpo.trained_steps), scored without gradient, advantages standardised within each group; then
         --num_inner_epochs passes over the round in minibatches of --train_batch_size prompts' groups, an optimizer
         step each (its images in --gradient_accumulation_steps micro-batches): a clipped importance-ratio loss over
         the trained steps (the later minibatches off-policy, bounded by --clip_range), plus --kl_beta times the KL
         to the base (the LoRA switched off). metrics.csv and the progress bar show its diagnostics (grpo.METRICS).
Each scorer is normalised by --reward_norm (none, group, prompt, calibrated: docs/reward.md) before --reward_weights
combine them.
The result is diffusers LoRA weights, alpha in their metadata: `pipeline.load_lora_weights(output_dir)`. Devices,
processes and --mixed_precision come from `accelerate launch` (or the flag here); --train_batch_size is per process.
The work is social_reward.training.generator.finetune_generator.
"""
import argparse

from social_reward.cli import run_cli
from social_reward.reward.normalization import REWARD_NORMS
from social_reward.training.flags import GRPO_INNER_EPOCHS, LR_SCHEDULERS, METHODS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # diffusers' flag names (train_text_to_image_lora.py and its family scripts); today's names stay as aliases
    parser.add_argument("--pretrained_model_name_or_path", "--pretrained_model", required=True,
                        help="a pipeline folder (save_pretrained) of SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="prompts to train on: a text file (one a line), a json list, or a pair source (its prompts)")
    parser.add_argument("--scorer", action="append", required=True, help="[NAME=]KIND:PATH[,key=value], repeatable")
    parser.add_argument("--reward_weights", type=float, nargs="+", default=None, help="one per --scorer (default 1 each)")
    parser.add_argument("--method", default="draft", choices=METHODS)
    parser.add_argument("--reward_norm", default="none", choices=REWARD_NORMS,
                        help="each scorer's normalisation before --reward_weights combine them (docs/reward.md)")
    parser.add_argument("--calibration", default=None, help="a calibration.json for --reward_norm calibrated")
    parser.add_argument("--group_size", type=int, default=8, help="grpo: images a prompt (--train_batch_size counts prompts)")
    parser.add_argument("--sample_batch_size", type=int, default=None,
                        help="grpo: prompts a round samples, per process (default --train_batch_size; a multiple of it)")
    parser.add_argument("--num_inner_epochs", type=int, default=None,
                        help=f"grpo: passes over a round, each in minibatches of --train_batch_size prompts' groups, an "
                             f"optimizer step each (default {GRPO_INNER_EPOCHS})")
    parser.add_argument("--clip_range", type=float, default=1e-4, help="grpo: PPO's clip of the importance ratio")
    parser.add_argument("--timestep_fraction", type=float, default=1.0,
                        help="grpo: the first share of the steps that inject noise (grpo.trained_steps) to train")
    parser.add_argument("--kl_beta", type=float, default=0.0,
                        help="grpo: weight of the KL to the base (LoRA off); 0.004 is Flow-GRPO's 0.04 in these units")
    parser.add_argument("--noise_level", type=float, default=None,
                        help="grpo: DDIM's eta (default 1.0) or the flow SDE's noise level (default 0.7)")
    parser.add_argument("--sampling_steps", "--num_inference_steps", type=int, default=50)
    parser.add_argument("--grad_steps", type=int, default=1, help="DRaFT-K: the last K sampling steps with gradient")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance (1: none; FLUX: the guidance embedding); default: the pipeline's")
    parser.add_argument("--resolution", type=int, default=None, help="square images of this side (default: the "
                        "pipeline's own size)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--train_batch_size", "--batch_size", type=int, default=1,
                        help="prompts per process and batch (grpo: prompts whose groups make a minibatch)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=None,
                        help="batches per optimizer step (grpo: micro-batches a minibatch's images are split into)")
    parser.add_argument("--learning_rate", type=float, default=None, help="default 1e-4 (grpo: 3e-4, DDPO's and "
                        "Flow-GRPO's)")
    parser.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: none)")
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--output_dir", "--save_folder", default="./generator_lora")
    parser.add_argument("--checkpointing_steps", "--save_every", type=int, default=100,
                        help="optimizer steps between checkpoints and validation")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    parser.add_argument("--validation_prompts", default=None, nargs="+",
                        help="prompts whose images are scored (a fixed noise each) and saved at every checkpoint")
    parser.add_argument("--validation_batch_size", type=int, default=8, help="validation images per process and batch")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="of the denoiser, the VAE decoder and the reward")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                        help="default: accelerate launch's")
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' (in --output_dir) or a checkpoint-STEP folder")
    parser.add_argument("--skip_nonfinite_loss", action="store_true", help="skip steps whose loss is nan/inf")
    parser.add_argument("--report_to", default=None, help="an accelerate tracker: tensorboard, wandb, ...")
    args = parser.parse_args()
    from social_reward.training.generator import finetune_generator

    finetune_generator(**vars(args))


if __name__ == "__main__":
    run_cli(main)
