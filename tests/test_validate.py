import re

import pytest
import torch
from conftest import TINY_CLIP, run_script
from original import original_scores

from social_reward.errors import InputError
from social_reward.devices import default_device
from social_reward.models.clip import load_model
from social_reward.scoring.encoding import pair_scores
from validate import validate_image_pair_classifier


@pytest.fixture
def repeating_pairs(shapes_pairs):
    """Preference data repeats images and prompts across pairs; the last pair is a tie (the same image twice)."""
    pairs = shapes_pairs.copy()
    pairs.loc[5:10, "pos_path"] = pairs.pos_path[0]
    pairs.loc[11:15, "prompt"] = pairs.prompt[1]
    pairs.loc[len(pairs) - 1, "neg_path"] = pairs.pos_path[len(pairs) - 1]
    return pairs


def test_scores_and_accuracy_equal_the_originals_on_the_same_weights(repeating_pairs, tiny_init):
    expected_pos, expected_neg = original_scores(repeating_pairs, tiny_init, TINY_CLIP, batch_size=7)
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    pos, neg = pair_scores(model, preprocess, tokenizer, repeating_pairs, "cpu", batch_size=5, progress=False)
    assert torch.allclose(pos, expected_pos, atol=1e-6) and torch.allclose(neg, expected_neg, atol=1e-6)
    accuracy = validate_image_pair_classifier(repeating_pairs, tiny_init, "cpu", num_workers=0, model=TINY_CLIP)
    assert accuracy == (expected_pos >= expected_neg).float().mean().item()


def test_a_tie_counts_as_correct(repeating_pairs, tiny_init):
    tie = repeating_pairs.iloc[-1:]
    assert tie.pos_path.item() == tie.neg_path.item()
    assert validate_image_pair_classifier(tie, tiny_init, "cpu", num_workers=0, model=TINY_CLIP) == 1.0


def run_validate(*args):
    return run_script("validate.py", *args)


def test_the_cli_prints_the_originals_line(shapes_pairs, tiny_init, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    result = run_validate(str(tmp_path / "pairs.parquet"), "--checkout_path", tiny_init, "--model", TINY_CLIP,
                          "--device", "cpu", "--num_workers", "1")
    assert result.returncode == 0, result.stderr
    accuracy = validate_image_pair_classifier(shapes_pairs, tiny_init, "cpu", num_workers=0, model=TINY_CLIP)
    assert re.fullmatch(r"Accuracy: \d+\.\d\d%\n", result.stdout)
    assert result.stdout == f"Accuracy: {accuracy * 100:.2f}%\n"


def test_the_cli_names_a_missing_column_in_one_line(shapes_pairs, tmp_path):
    shapes_pairs.drop(columns="prompt").to_parquet(tmp_path / "pairs.parquet")
    result = run_validate(str(tmp_path / "pairs.parquet"), "--model", TINY_CLIP, "--pretrained", "none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'pairs.parquet'}: missing column 'prompt' "
                                                  f"(needs prompt, pos_path, neg_path; has pos_path, neg_path)"]


def test_the_cli_names_an_unreadable_image_from_a_loader_worker_in_one_line(shapes_pairs, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    shapes_pairs.loc[3, "neg_path"] = str(tmp_path / "broken.png")
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    result = run_validate(str(tmp_path / "pairs.parquet"), "--model", TINY_CLIP, "--pretrained", "none",
                          "--device", "cpu", "--num_workers", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: row 3, column 'neg_path': {tmp_path / 'broken.png'}: cannot read image")


def test_the_device_defaults_to_cuda_only_where_there_is_one(monkeypatch, shapes_pairs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    with pytest.raises(InputError, match="--device cuda: no CUDA device on this machine"):
        validate_image_pair_classifier(shapes_pairs, device="cuda", model=TINY_CLIP, pretrained="none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"


def test_each_distinct_image_is_decoded_and_encoded_once(repeating_pairs, tiny_init):
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    opened = []
    pair_scores(model, lambda image: opened.append(image.filename) or preprocess(image), tokenizer, repeating_pairs,
                "cpu", progress=False)
    distinct = set(repeating_pairs.pos_path) | set(repeating_pairs.neg_path)
    assert sorted(opened) == sorted(distinct) and len(distinct) < 2 * len(repeating_pairs)


@pytest.mark.parametrize("precision, bound", [("bf16", 1e-2), ("fp16", 1e-3)])
def test_half_precision_runs_under_autocast_and_moves_scores_less_than_a_bound(precision, bound, shapes_pairs,
                                                                              tiny_init):
    from social_reward.devices import inference_precision
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    products = []
    model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda m, i, out: products.append(out.dtype))
    fp32 = pair_scores(model, preprocess, tokenizer, shapes_pairs, "cpu", progress=False)
    assert set(products) == {torch.float32}
    products.clear()
    with inference_precision("cpu", precision):
        half = pair_scores(model, preprocess, tokenizer, shapes_pairs, "cpu", progress=False)
    assert set(products) == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    # measured on this tiny model: 3.9e-3 (bf16), 2.2e-4 (fp16); ViT-L/14: benchmarks/bench.py
    assert all(0 < (h - f).abs().max() < bound and h.dtype == torch.float32 for h, f in zip(half, fp32))


def test_the_precision_flag_reaches_the_scores(shapes_pairs, tiny_init, tmp_path):
    pairs_file = str(tmp_path / "pairs.parquet")
    shapes_pairs.to_parquet(pairs_file)
    scores = {}
    for precision in ("fp32", "bf16"):
        out = str(tmp_path / f"{precision}.csv")
        assert run_validate(pairs_file, "--model", TINY_CLIP, "--checkout_path", tiny_init, "--precision", precision,
                            "--scores_out", out).returncode == 0
        scores[precision] = __import__("pandas").read_csv(out)
    assert 0 < (scores["fp32"].pos_score - scores["bf16"].pos_score).abs().max() < 1e-2
