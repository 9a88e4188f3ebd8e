"""Score and rank images for a prompt: the cosine similarity validate.py compares, best first.

    python scripts/score.py --prompt "a cat astronaut, digital art" a.png b.png c.png --checkout_path clip_final.pth \\
        --output scores.csv --grid ranking.png
    python scripts/score.py --prompt "a cat astronaut" a.png b.png c.png --checkout_path clip_final.pth \\
        --calibration comparison/calibration.json

--calibration FILE (scripts/compare.py --calibrate or validate.py --calibrate writes one, for this scorer) prints beside
each score the probability that the image beats the prompt's median image (the median score), or --reference IMAGE.
The work is social_reward.scoring.ranking.rank_images.
"""
import argparse

from social_reward.cli import add_model_flags, run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files to rank")
    parser.add_argument("--prompt", required=True)
    add_model_flags(parser, inference=True)
    parser.add_argument("--scorer", default=None, help="another reward model, KIND:PATH[,key=value] (see "
                        "social_reward/scorers/registry.py)")
    parser.add_argument("--output", default=None, help="write path,score rows to this .csv")
    parser.add_argument("--grid", default=None, help="draw the ranking into this image file (.png)")
    parser.add_argument("--calibration", default=None, help="a calibration.json of this scorer: print the probability "
                        "that each image beats the median one (or --reference)")
    parser.add_argument("--reference", default=None, help="with --calibration: the image (one of those given) the "
                        "probabilities are against")
    args = parser.parse_args()
    from social_reward.dist import is_main_process
    from social_reward.scoring.pictures import contact_sheet
    from social_reward.scoring.ranking import rank_images

    ranking = rank_images(args.prompt, args.images, args.checkout_path, args.device, args.batch_size,
                          args.num_workers, args.model, args.pretrained, args.fast_decode, args.scorer, args.precision,
                          args.calibration, args.reference)
    if not is_main_process():
        return
    against = f"beats {args.reference}" if args.reference else "beats the median"
    for rank, row in enumerate(ranking.itertuples(), start=1):
        beside = f"  P({against}) {row.p_win:.3f}" if args.calibration else ""
        print(f"{rank:>4}  {row.score:.4f}{beside}  {row.path}")
    if args.output:
        ranking.to_csv(args.output, index=False)
    if args.grid:
        contact_sheet(ranking, args.grid)


if __name__ == "__main__":
    run_cli(main)
