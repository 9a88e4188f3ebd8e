"""Text-to-image models side by side under any rewards: a leaderboard of mean scores and the win rate of each model
over each other on the prompts both have (the paper's table of a fine-tuned Stable Diffusion against its base).

    python scripts/evaluate_generators.py generations.parquet --scorer ours=clip:clip_final.pth \\
        --scorer hps=hpsv2:HPS_v2.1_compressed.pt --scorer pickscore=pickscore:PickScore_v1 --out generators/
    python scripts/evaluate_generators.py hps_images/ --prompts HPSv2/benchmark/ --scorer ours=clip:clip_final.pth

Generations come as a table (generator, prompt, image[, sample, style]; scripts/generate.py writes one) or in HPS
v2's benchmark layout (ROOT/<generator>/<style>/<index:05d>.jpg with --prompts holding <style>.json). An item is a
(style, prompt, sample); win rates count only the items both generators have, and beside each generator's mean over
its own images the leaderboard holds its mean over the items every generator has (shared_items says how many).
Intervals treat the prompt as the unit: 4 samples of a prompt are not 4 independent prompts. Writes into --out:
leaderboard.csv, leaderboard.md, winrates.csv, scores.parquet and generators.png; scores are kept in --out/scores as
they are made, so a rerun (or a run with one more generator) scores only what is missing. The work is
social_reward.scoring.leaderboard.evaluate_generators.
"""
import argparse
import os

from social_reward.cli import add_inference_flags, run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generations", nargs="+", help="generation tables (.parquet/.csv) or HPS v2 image folders")
    parser.add_argument("--scorer", action="append", default=[], required=True, help="NAME=KIND:PATH[,key=value]")
    parser.add_argument("--prompts", default=None, help="HPS v2 layout: the folder of <style>.json prompt lists")
    parser.add_argument("--out", default="generators")
    parser.add_argument("--prompts_shown", type=int, default=4, help="prompts in generators.png")
    add_inference_flags(parser)
    parser.add_argument("--skip_bad_images", action="store_true", help="leave out unreadable images (counted)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args()
    from social_reward.dist import is_main_process
    from social_reward.scoring.leaderboard import OUTPUTS, evaluate_generators, leaderboard_markdown

    board, rates = evaluate_generators(args.generations, args.scorer, args.out, args.prompts, args.prompts_shown,
                                       args.device, args.batch_size, args.num_workers, args.fast_decode,
                                       args.precision, args.skip_bad_images, args.overwrite)
    if not is_main_process():
        return
    print(leaderboard_markdown(board), end="")
    for row in rates[rates["style"] == "all"].itertuples():
        print(f"{row.scorer}: {row.generator} over {row.other}: {100 * row.win_rate:.1f}% "
              f"[{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}] of {row.items} shared items, {row.prompts} prompts")
    written = [f for f in OUTPUTS[:5] if os.path.exists(os.path.join(args.out, f))]
    print(f"written: {', '.join(os.path.join(args.out, f) for f in written)}")


if __name__ == "__main__":
    run_cli(main)
