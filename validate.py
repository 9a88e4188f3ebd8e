"""Pairwise accuracy: how often the model scores the preferred image above the other one for the prompt (the
original's validation script, its flags, output and notebook imports unchanged).

    python validate.py validation_data.parquet --checkout_path clip_epoch_4_global_step_final.pth
    python validate.py validation_data.parquet --checkout_path clip_final.pth --calibrate calibration.json

--calibrate FILE also fits the model's temperature (P(pos beats neg) = sigmoid(t * score gap), fitted on 80% of the
prompts, its ECE reported on the other 20%) and writes FILE and its reliability diagram beside it (.png). The work is
social_reward.scoring.validation; `from validate import validate_image_pair_classifier, pair_scores` (the original's
notebook import, and the scores behind it) still works.
"""
import argparse

from social_reward.cli import add_model_flags, run_cli


def __getattr__(name):
    """The notebook imports, loaded when asked for: the script's --help needs no torch."""
    if name == "validate_image_pair_classifier":
        from social_reward.scoring.validation import validate_image_pair_classifier
        return validate_image_pair_classifier
    if name == "pair_scores":
        from social_reward.scoring.encoding import pair_scores
        return pair_scores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet_file", nargs="+", help="pairs: a table with columns prompt, pos_path, neg_path; "
                        "Pick-a-Pic parquet shards (files, a glob or a folder); an HPD v2 or ImageReward json")
    add_model_flags(parser, inference=True)
    parser.add_argument("--scores_out", default=None, help="write each pair's scores here (.csv or .parquet)")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip pairs whose images cannot be read")
    parser.add_argument("--image_root", default=None,
                        help="the image folder of an HPD v2 or ImageReward json (default: beside the json)")
    parser.add_argument("--scorer", default=None, help="another reward model, KIND:PATH[,key=value]: clip:, hpsv2:, "
                        "pickscore:, aesthetic:, imagereward:, hpsv3:, mps: (social_reward/scorers/registry.py); "
                        "default: --model, --pretrained, --checkout_path")
    parser.add_argument("--tie_threshold", type=float, default=0.0,
                        help="Pick-a-Pic: predict a tie when the two images' probabilities differ by at most this")
    parser.add_argument("--calibrate", default=None, metavar="FILE", help="also fit the model's temperature and "
                        "write it to FILE (.json) with its reliability diagram beside it (see docs/scorers.md)")
    args = parser.parse_args()
    from social_reward.dist import is_main_process
    from social_reward.scoring.calibration import calibration_note
    from social_reward.scoring.validation import evaluate_source

    result = evaluate_source(args.parquet_file, args.checkout_path, args.device, args.batch_size, args.num_workers,
                             args.model, args.pretrained, args.scores_out, args.skip_bad_images, args.image_root,
                             args.tie_threshold, args.fast_decode, args.scorer, args.precision, args.calibrate)
    if not is_main_process():
        return
    print(f"Accuracy: {result['accuracy'] * 100:.2f}%")
    if args.calibrate:
        print(calibration_note("scorer", result["calibration"]) + f"; written: {args.calibrate}")
    if result["metric"]:
        name, value = result["metric"]
        threshold = f" (tie threshold {args.tie_threshold:g})" if name.startswith("Pick-a-Pic") else ""
        print(f"{name}: {value * 100:.2f}%{threshold}")


if __name__ == "__main__":
    run_cli(main)
