"""Pairwise accuracy: how often a scorer scores the preferred image above the other one for the prompt, and each
benchmark's own metric; the work of validate.py (which hands validate_image_pair_classifier on under the original's
import path).

    accuracy = validate_image_pair_classifier("validation_data.parquet", checkout_path="clip_final.pth")
    result = evaluate_source("HPD/test.json", scorer="hpsv2:HPS_v2.1_compressed.pt", calibrate_to="cal.json")
"""
import sys

import torch

from social_reward.data.cells import describe
from social_reward.data.pairs import drop_unreadable_pairs
from social_reward.data.sources import read_source
from social_reward.devices import default_device, default_num_workers, inference_precision
from social_reward.dist import is_main_process, process_device
from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from social_reward.scorers.clip import clip_scorer
from social_reward.scorers.registry import check_spec, load_scorer
from social_reward.scoring.calibration import (
    calibrate,
    calibration_entries,
    flags_spec,
    source_pairs,
    write_calibration,
)
from social_reward.scoring.encoding import source_scores
from social_reward.scoring.metrics import benchmark_metric, counted_correct


def write_pair_scores(pairs, pos_score, neg_score, path):
    """Every pair with its pos_score, neg_score and whether it counted as correct, as csv or parquet by extension."""
    table = pairs.assign(pos_score=pos_score.numpy(), neg_score=neg_score.numpy(),
                         correct=counted_correct(pos_score, neg_score).numpy())
    write_table(table, path, "row")


def write_group_scores(source, group_scores, path):
    """A benchmark source's every image with its score: a row per (entry, image) with its label (Pick-a-Pic) or rank."""
    annotation = "label" if source.layout == "pickapic" else "rank"
    table = source.groups.assign(score=group_scores).rename(columns={"images": "image", "labels": annotation})
    table = table.explode(["image", annotation, "score"], ignore_index=True)
    table["image"] = table.image.map(describe)
    write_table(table.astype({"score": "float64"}), path, None)


def write_table(table, path, index_label):
    table.to_parquet(path) if path.endswith(".parquet") else table.to_csv(path, index=index_label is not None,
                                                                           index_label=index_label)


def evaluate_source(source, checkout_path=None, device=None, batch_size=1024, num_workers=None, model=DEFAULT_MODEL,
                    pretrained=DEFAULT_PRETRAINED, scores_out=None, skip_bad_images=False, image_root=None,
                    tie_threshold=0.0, fast_decode=False, scorer=None, precision="fp32", calibrate_to=None):
    """Read a source, score it, and return {"accuracy", "pairs", "metric": (name, value) or None}: the original's
    pairwise accuracy (ties left out) and, for a benchmark layout, that benchmark's own metric. Under several
    processes (accelerate launch, torchrun) each encodes a share, every one returns the result, the main one writes.

    scorer:    a scorer spec (e.g. "hpsv2:HPS_v2.1_compressed.pt") instead of model/pretrained/checkout_path.
    precision: "fp32" (the original's), or "bf16"/"fp16" (autocast).
    calibrate_to: a .json path: also fit the scorer's temperature, write it there (and the reliability diagram
                  beside it, .png) and return it as result["calibration"] (calibration.py)."""
    device = process_device(device or default_device())
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"--batch_size must be at least 1 and --num_workers at least 0 (got {batch_size}, {num_workers})")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if scores_out is not None and not scores_out.endswith((".csv", ".parquet")):
        raise InputError(f"--scores_out {scores_out}: name a .csv or .parquet file")
    if not 0 <= tie_threshold <= 1:
        raise InputError(f"--tie_threshold must be between 0 and 1 (got {tie_threshold})")
    if scorer is not None:
        check_spec(scorer)
    if calibrate_to is not None and not calibrate_to.endswith(".json"):
        raise InputError(f"--calibrate {calibrate_to}: name a .json file")
    spec = scorer or flags_spec(model, pretrained, checkout_path)
    precision_context = inference_precision(device, precision)
    # the data is checked before the model loads: a typo costs seconds, not a ViT-L/14 load
    source = read_source(source, image_root, check_files=not skip_bad_images)
    if source.left_out and is_main_process():
        print(source.left_out, file=sys.stderr)
    if skip_bad_images:
        source, skipped = drop_unreadable_pairs(source)
        if skipped and is_main_process():
            print(skipped, file=sys.stderr)
    scorer = load_scorer(scorer, device) if scorer else clip_scorer(model, pretrained, checkout_path, device)
    with precision_context:
        pos_score, neg_score, group_scores = source_scores(scorer.model, scorer.preprocess, scorer.tokenizer, source,
                                                           device, batch_size, num_workers, fast_decode=fast_decode)
    if scores_out is not None and is_main_process():
        if group_scores is None:
            write_pair_scores(source.pairs, pos_score, neg_score, scores_out)
        else:
            write_group_scores(source, group_scores, scores_out)
    metric = benchmark_metric(source, group_scores, scorer.softmax_scale, tie_threshold)
    result = {"accuracy": counted_correct(pos_score, neg_score).float().mean().item(), "pairs": len(source.pairs),
              "metric": metric}
    if calibrate_to is not None:
        pos, neg, prompts, labels = source_pairs(source, pos_score.numpy(), neg_score.numpy(), group_scores)
        fit = calibrate(pos, neg, prompts.tolist(), labels, name=f"--calibrate {calibrate_to}")
        result["calibration"] = calibration_entries({"scorer": fit}, {"scorer": spec})["scorer"]
        if is_main_process():
            write_calibration({"scorer": result["calibration"]}, calibrate_to)
    return result


def validate_image_pair_classifier(parquet_file_or_pandas_dataframe, checkout_path=None, device=None, batch_size=1024,
                                   num_workers=None, model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED,
                                   scores_out=None, skip_bad_images=False, image_root=None, fast_decode=False):
    """Pairwise accuracy of a (fine-tuned) CLIP on a pair table (or any source read_source reads), as a fraction.

    scores_out:      also write every pair's scores there (.csv or .parquet); for a benchmark, every image's.
    skip_bad_images: leave out the pairs whose images cannot be read (reported) instead of stopping.

    Example:
        accuracy = validate_image_pair_classifier("validation_data.parquet", checkout_path="classifier_checkpoint.pth")
        print(f"Accuracy: {accuracy * 100:.2f}%")
    """
    return evaluate_source(parquet_file_or_pandas_dataframe, checkout_path, device, batch_size, num_workers, model,
                           pretrained, scores_out, skip_bad_images, image_root, fast_decode=fast_decode)["accuracy"]
