"""Generate images for evaluation: N samples per prompt from a pipeline folder of any supported family (SD 1.x/2.x,
SDXL, SD3/3.5, FLUX.1), with or without a fine-tuning's LoRA, appended to a generations table that
scripts/evaluate_generators.py reads.

    python scripts/generate.py --pretrained_model_name_or_path stable-diffusion-2-1-base/ --prompts prompts.txt \\
        --samples 4 --generator base --output_dir generations/
    python scripts/generate.py --pretrained_model_name_or_path stable-diffusion-2-1-base/ --lora sd_lora/ \\
        --prompts prompts.txt --samples 4 --generator tuned --output_dir generations/
    python scripts/evaluate_generators.py generations/generations.parquet --scorer ours=clip:clip_final.pth --out table/

Images go to OUT/GENERATOR/PPPPP_K.png (prompt line P, sample K) and rows (generator, prompt, sample, image: the
path relative to OUT, as the generations reader reads it; prompt_index: the prompt's line) to OUT/generations.parquet.
A prompt listed twice (HPS v2's lists repeat some) keeps its lines apart: its second line's samples are numbered
after its first's (N..2N-1), as a repeated prompt of a folder is numbered. For a given --seed, sample K of a prompt
starts from the same noise for every generator (and in finetune_generator.py's validation, sample 0), so generators
are compared image for image. Rows are journaled in OUT/GENERATOR/rows.jsonl as images are written: a killed run,
started again with the same flags, goes on where it stopped. The work is social_reward.generators.generate.generate.
"""
import argparse

from social_reward.cli import run_cli
from social_reward.devices import PRECISIONS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # diffusers' names (its pipelines' arguments and LoRA scripts' flags); today's names stay as aliases
    parser.add_argument("--pretrained_model_name_or_path", "--pretrained_model", required=True,
                        help="a pipeline folder (save_pretrained) of SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1")
    parser.add_argument("--lora", default=None,
                        help="LoRA weights: a scripts/finetune_generator.py output_dir or checkpoint")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="a text file (one a line), a json list, or a pair source (its prompts)")
    parser.add_argument("--samples", type=int, default=1, help="images per prompt")
    parser.add_argument("--generator", required=True, help="the name of these images in the table")
    parser.add_argument("--output_dir", "--out", required=True, help="folder of the images and generations.parquet")
    parser.add_argument("--resolution", type=int, default=None, help="square images (default: the pipeline's size)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_inference_steps", "--sampling_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's own")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--overwrite", action="store_true", help="replace the rows of a --generator already in the "
                        "table (or a stopped run's)")
    args = parser.parse_args()
    from social_reward.generators.generate import generate

    generate(**vars(args))


if __name__ == "__main__":
    run_cli(main)
