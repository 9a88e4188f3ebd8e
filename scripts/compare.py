"""Compare reward models on the same pairs: a table of accuracies, how often they agree, and what each picks.

    python scripts/compare.py val.parquet HPD/test.json --image_root HPD/test \\
        --scorer ours=clip:clip_epoch_4_global_step_final.pth --scorer clip=clip:ViT-L-14.pt \\
        --scorer hps=hpsv2:HPS_v2.1_compressed.pt --scorer pickscore=pickscore:PickScore_v1 \\
        --scorer aesthetic=aesthetic:sac+logos+ava1-l14-linearMSE.pth,clip=ViT-L-14.pt --out comparison/

Every source (any layout the scripts read) is scored by every scorer, one scorer's model in memory at a time, each
distinct image and prompt encoded once. Scores are kept in --out as they are made: run again after an interruption,
and only what is missing is scored. Writes table.csv, table.md, agreement.csv and comparison.png into --out; with
--calibrate also calibration.json and calibration.png (social_reward/scoring/calibration.py: each scorer's
temperature, fitted on the pairs of 80% of the prompts, its ECE reported on the other 20%, every source pooled).

An accuracy's 95% interval treats the prompt as the unit (social_reward/scoring/intervals.py): a benchmark with
several pairs a prompt (HPD v2, ImageReward) has fewer independent prompts than pairs. The work is
social_reward.scoring.comparison.compare.
"""
import argparse
import os

from social_reward.cli import add_inference_flags, run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="pair sources: tables, Pick-a-Pic shards (a glob or folder each), "
                        "HPD v2 / ImageReward json")
    parser.add_argument("--scorer", action="append", default=[], required=True, help="NAME=KIND:PATH[,key=value]")
    parser.add_argument("--out", default="comparison")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in comparison.png")
    parser.add_argument("--image_root", default=None)
    add_inference_flags(parser)
    parser.add_argument("--tie_threshold", type=float, default=0.0)
    parser.add_argument("--calibrate", action="store_true", help="fit each scorer's temperature: calibration.json, "
                        "calibration.png (what a score difference means as a probability; see docs/scorers.md)")
    args = parser.parse_args()
    from social_reward.dist import is_main_process
    from social_reward.scoring.comparison import compare, markdown_table

    table = compare(args.sources, args.scorer, args.out, args.prompts, args.image_root, args.device, args.batch_size,
                    args.num_workers, args.tie_threshold, args.fast_decode, args.precision, args.calibrate)
    if not is_main_process():
        return
    print(markdown_table(table), end="")
    written = ("table.csv", "table.md", "agreement.csv", "comparison.png") + (
        ("calibration.json", "calibration.png") if args.calibrate else ())
    print(f"written: {', '.join(os.path.join(args.out, f) for f in written)}")


if __name__ == "__main__":
    run_cli(main)
