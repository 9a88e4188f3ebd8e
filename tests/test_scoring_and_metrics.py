import pandas as pd
import pytest
import torch
from conftest import MICRO_CLIP, TINY_CLIP, run_script
from PIL import Image

from social_reward.models.clip import load_model
from social_reward.scoring.ranking import rank_images, score_images
from train_pair_pos_neg import finetune_model
from social_reward.scoring.encoding import pair_scores
from validate import validate_image_pair_classifier


def test_scores_are_the_cosine_similarities_validate_compares(shapes_pairs, tiny_init):
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    pos_score, neg_score = pair_scores(model, preprocess, tokenizer, shapes_pairs, "cpu", progress=False)
    prompt = shapes_pairs.prompt[0]
    scores = score_images(prompt, [shapes_pairs.pos_path[0], shapes_pairs.neg_path[0]], model, preprocess, tokenizer)
    assert torch.allclose(scores, torch.stack([pos_score[0], neg_score[0]]), atol=1e-6)


def test_rank_images_puts_the_best_first(shapes_pairs, tiny_init):
    paths = list(shapes_pairs.pos_path[:6])
    ranking = rank_images("two red circles", paths, tiny_init, "cpu", num_workers=0, model=TINY_CLIP)
    assert sorted(ranking.path) == sorted(paths)
    assert list(ranking.score) == sorted(ranking.score, reverse=True)


def test_the_score_cli_prints_the_ranking_and_writes_csv_and_a_contact_sheet(shapes_pairs, tiny_init, tmp_path):
    paths = list(shapes_pairs.pos_path[:7])
    result = run_script("scripts/score.py", "--prompt", "three blue squares", *paths, "--checkout_path", tiny_init, "--model",
                        TINY_CLIP, "--device", "cpu", "--num_workers", "0", "--output", str(tmp_path / "scores.csv"),
                        "--grid", str(tmp_path / "grid.png"))
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "scores.csv")
    assert list(written.columns) == ["path", "score"] and len(written) == 7
    printed = [line.split() for line in result.stdout.strip().splitlines()]
    assert [row[2] for row in printed] == list(written.path) and [int(row[0]) for row in printed] == list(range(1, 8))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (5 * 224, 2 * (224 + 28))  # 7 images: two rows of five, a label under each


def test_validate_writes_every_pairs_scores(shapes_pairs, tiny_init, tmp_path):
    for name in ("scores.csv", "scores.parquet"):
        accuracy = validate_image_pair_classifier(shapes_pairs, tiny_init, "cpu", num_workers=0, model=TINY_CLIP,
                                                  scores_out=str(tmp_path / name))
        table = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        assert len(table) == len(shapes_pairs)
        assert {"prompt", "pos_path", "neg_path", "pos_score", "neg_score", "correct"} <= set(table.columns)
        assert (table.correct == (table.pos_score >= table.neg_score)).all()
        assert table.correct.mean() == pytest.approx(accuracy)


def test_pairwise_loss_learns_a_small_set_and_ends_elsewhere_than_triplet(trained_micro):
    # conftest's trained_micro: 160 pairs, 4 epochs from one init with each loss
    pairs = trained_micro["pairs"]
    assert validate_image_pair_classifier(pairs, trained_micro["pairwise"], "cpu", num_workers=0,
                                          model=MICRO_CLIP) >= 0.9
    pairwise, triplet = (torch.load(trained_micro[n], weights_only=True) for n in ("pairwise", "triplet"))
    start = torch.load(trained_micro["init"], weights_only=True)
    assert pairwise["logit_scale"] != start["logit_scale"]  # trained by the pairwise loss in mode "all"
    assert triplet["logit_scale"] == start["logit_scale"]  # not in the triplet loss: never moves
    assert not torch.equal(pairwise["visual.proj"], triplet["visual.proj"])


def test_metrics_csv_has_a_row_per_step_and_validation_at_each_checkpoint(shapes_pairs, tiny_init, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "val.parquet")
    # 10 pairs in batches of 3: 4 steps an epoch, 2 epochs; validation every 3 steps and at each epoch end
    finetune_model(shapes_pairs.iloc[:10], "visual_last_layer", batch_size=3, n_epochs=2,
                   save_folder=str(tmp_path / "run"), checkout_path=tiny_init, model=TINY_CLIP, num_workers=0,
                   save_every=3, validation_file=str(tmp_path / "val.parquet"))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "step", "loss", "learning_rate", "val_accuracy"]
    assert list(metrics.step) == list(range(1, 9)) and list(metrics.epoch) == [0] * 4 + [1] * 4
    assert list(metrics.step[metrics.val_accuracy.notna()]) == [3, 4, 6, 8]
    assert metrics.learning_rate.eq(3e-5).all() and metrics.loss.notna().all()
    final = validate_image_pair_classifier(shapes_pairs, str(tmp_path / "run" / "clip_epoch_1_global_step_final.pth"),
                                           "cpu", num_workers=0, model=TINY_CLIP)
    assert metrics.val_accuracy.iloc[-1] == pytest.approx(final)


def test_report_to_tensorboard_logs_the_same_metrics(shapes_pairs, tiny_init, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    finetune_model(shapes_pairs.iloc[:6], "visual_last_layer", batch_size=3, n_epochs=1, save_folder=str(tmp_path / "run"),
                   checkout_path=tiny_init, model=TINY_CLIP, num_workers=0, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "social_reward")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert [s for s, _ in logged] == list(metrics.step)
    assert [v for _, v in logged] == pytest.approx(list(metrics.loss))


def test_a_truncated_jpeg_decoded_in_a_loader_worker_is_drawn_too(shapes_pairs, tiny_init, tmp_path):
    """The loader's worker reads the truncated JPEG as the original's loader did (the missing part grey); the main
    process, which draws the contact sheet, must read it the same way, not fail on it."""
    import io
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    paths = [str(tmp_path / "cut.jpg"), *shapes_pairs.pos_path[:2]]
    result = run_script("scripts/score.py", "--prompt", "three blue squares", *paths, "--checkout_path", tiny_init,
                        "--model", TINY_CLIP, "--device", "cpu", "--num_workers", "1", "--grid",
                        str(tmp_path / "grid.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "grid.png").exists() and str(tmp_path / "cut.jpg") in result.stdout
