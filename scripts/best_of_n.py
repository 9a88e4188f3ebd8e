"""Best of N: for each prompt keep the K candidates the reward scores highest, as a fine-tuning set in the layout the
diffusers training scripts read (a Hugging Face image folder).

    python scripts/best_of_n.py candidates.parquet --scorer clip:clip_final.pth --top_k 1 --out best/
    # then: datasets.load_dataset("imagefolder", data_dir="best/"), or diffusers' train_text_to_image.py --train_data_dir best/

Candidates are a table (prompt, image[, generator, sample]; scripts/generate.py writes one). --out gets the kept
images (hard-linked where possible, else copied; image bytes written as files) and metadata.jsonl, a line per image
with its file_name, text (the prompt) and score; the folder appears whole when it is done. The work is
social_reward.scoring.best_of_n.best_of_n.
"""
import argparse
import os

from social_reward.cli import add_inference_flags, run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", help="candidate tables (.parquet/.csv): prompt, image[, generator, sample]")
    parser.add_argument("--scorer", required=True, help="the reward, KIND:PATH[,key=value] (see "
                        "social_reward/scorers/registry.py)")
    parser.add_argument("--top_k", type=int, default=1, help="images kept per prompt")
    parser.add_argument("--out", default="best_of_n", help="the image folder to write (new or empty, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    add_inference_flags(parser)
    args = parser.parse_args()
    from social_reward.dist import is_main_process
    from social_reward.scoring.best_of_n import best_of_n

    result = best_of_n(args.candidates, args.scorer, args.top_k, args.out, args.device, args.batch_size,
                       args.num_workers, args.fast_decode, args.precision, args.overwrite)
    if not is_main_process():
        return
    print(f"mean score: {result['mean_all']:.4f} over all {result['candidates']} candidates, "
          f"{result['mean_kept']:.4f} over the {result['kept']} kept")
    print(f"written: {os.path.join(args.out, 'metadata.jsonl')} and {result['kept']} images")


if __name__ == "__main__":
    run_cli(main)
