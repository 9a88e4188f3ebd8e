import json
import os

import numpy as np
import pandas as pd
import pytest
import scipy.optimize
from conftest import TINY_CLIP, run_script
from PIL import Image

from social_reward.scoring.calibration import (calibrate, calibration_entries, calibration_note,
    expected_calibration_error, fit_temperature, held_out, pair_nll, read_calibration, win_probability,
    write_calibration)
from social_reward.errors import InputError
from social_reward.scoring.comparison import compare, comparison_table
from social_reward.scoring.leaderboard import leaderboard, win_rates
from social_reward.scoring.intervals import prompt_mean_interval, prompt_proportion_interval
from social_reward.data.sources import read_source
from social_reward.scoring.intervals import wilson_interval
from social_reward.scoring.ranking import rank_images
from social_reward.scoring.validation import evaluate_source


def preference_pairs(n, temperature, seed=0, ties=0):
    """n pairs whose preferred side is drawn with P(a beats b) = sigmoid(t * (s_a - s_b)): a calibrated scorer; the
    first `ties` pairs are ties (label 0.5)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.3, 0.02, n), rng.normal(0.3, 0.02, n)
    a_wins = rng.random(n) < 1 / (1 + np.exp(-temperature * (a - b)))
    labels = np.ones(n)
    labels[:ties] = 0.5
    return np.where(a_wins, a, b), np.where(a_wins, b, a), labels


def test_the_fitted_temperature_is_the_direct_maximum_likelihood_one_ties_counting_one_half():
    pos, neg, labels = preference_pairs(3000, 40.0, ties=300)
    direct = scipy.optimize.minimize_scalar(lambda t: pair_nll(t, pos - neg, labels), bounds=(-500, 500),
                                            method="bounded", options={"xatol": 1e-10}).x
    assert fit_temperature(pos, neg, labels) == pytest.approx(direct, abs=1e-4)
    # a tie pulls towards no preference: the same pairs with the ties counted as wins fit a larger temperature
    assert fit_temperature(pos, neg) > fit_temperature(pos, neg, labels)


def test_a_set_generated_calibrated_has_an_ece_near_zero_and_an_overconfident_one_does_not():
    pos, neg, labels = preference_pairs(20000, 40.0, seed=1)
    t = fit_temperature(pos, neg)
    assert t == pytest.approx(40.0, rel=0.05)
    assert expected_calibration_error(win_probability(pos, neg, t), labels) < 0.015
    assert expected_calibration_error(win_probability(pos, neg, 4 * t), labels) > 0.1


def test_fit_on_some_prompts_and_report_on_the_others_held_out_by_hash():
    pos, neg, _ = preference_pairs(2000, 40.0, seed=2)
    prompts = [f"prompt {i // 4}" for i in range(2000)]  # 4 pairs a prompt, all on one side of the split
    entry = calibrate(pos, neg, prompts)
    report = held_out(prompts)
    assert entry["held_out_pairs"] == report.sum() and entry["pairs"] == 2000 - report.sum()
    assert 0.1 < report.mean() < 0.3 and all(len(set(report[i:i + 4])) == 1 for i in range(0, 2000, 4))
    assert entry["temperature"] == pytest.approx(fit_temperature(pos[~report], neg[~report]), abs=1e-9)
    assert entry["nll"] == pytest.approx(pair_nll(entry["temperature"], pos[report] - neg[report], 1.0))
    assert entry["ece"] < 0.05 and not entry["separated"]


def test_a_scorer_right_on_every_pair_gets_a_finite_temperature_and_one_wrong_everywhere_a_negative_one_kept():
    pos, neg, _ = preference_pairs(200, 40.0)
    right, wrong = np.maximum(pos, neg), np.minimum(pos, neg)
    t = fit_temperature(right, wrong)
    assert 0 < t < np.inf and pair_nll(t, right - wrong, 1.0) < np.log(2)
    assert fit_temperature(wrong, right) == pytest.approx(-t)
    prompts = [f"p{i}" for i in range(200)]
    entry = calibrate(wrong, right, prompts)
    assert entry["temperature"] < 0 and entry["separated"]
    note = calibration_note("x", entry)
    assert "negative: this scorer prefers the other image; kept" in note and "Firth" in note


@pytest.mark.parametrize("pos, neg, labels, expected", [
    ([0.3], [0.2], None, "1 pair to calibrate on; a temperature needs at least 2"),
    ([0.3, 0.2, 0.4], [0.2, 0.3, 0.1], [0.5, 0.5, 0.5], "every one of the 3 pairs is a tie"),
    ([0.3, 0.2], [0.3, 0.2], None, "the same score: a score difference never occurs"),
])
def test_pairs_that_cannot_be_calibrated_end_in_one_line_naming_them(pos, neg, labels, expected):
    with pytest.raises(InputError, match=expected):
        fit_temperature(pos, neg, labels, name="scorer ours")


def test_repeated_samples_of_a_prompt_give_intervals_as_wide_as_one_sample():
    rng = np.random.default_rng(3)
    scores, wins = rng.normal(0.3, 0.02, 50), rng.integers(0, 2, 50).astype(float)
    prompts = [f"p{i}" for i in range(50)]
    four = np.repeat(np.arange(50), 4)  # 4 samples a prompt, each the same image
    assert prompt_mean_interval(scores[four], np.array(prompts)[four]) == pytest.approx(
        prompt_mean_interval(scores, prompts))
    assert prompt_proportion_interval(wins[four], np.array(prompts)[four]) == pytest.approx(
        prompt_proportion_interval(wins, prompts))
    # with one sample a prompt they are the usual ones
    half = 1.96 * scores.std(ddof=1) / np.sqrt(50)
    assert prompt_mean_interval(scores, prompts)[1:] == pytest.approx((scores.mean() - half, scores.mean() + half))
    assert prompt_proportion_interval(wins, prompts) == pytest.approx(wilson_interval(wins.sum(), 50))


def test_the_leaderboard_and_win_rates_of_repeated_samples_are_prompt_level_overall_and_per_style():
    rng = np.random.default_rng(4)
    rows = []
    for generator, shift in (("base", 0.0), ("tuned", 0.01)):
        for p in range(40):
            score = 0.3 + shift + rng.normal(0, 0.02)
            for sample in range(4):  # the same image 4 times
                rows.append({"scorer": "ours", "generator": generator, "style": ["anime", "photo"][p % 2],
                             "prompt": f"prompt {p}", "sample": sample, "image": f"{generator}/{p}.png",
                             "score": score})
    scores = pd.DataFrame(rows)
    once = scores[scores["sample"] == 0]
    for table in (leaderboard, win_rates):
        repeated, single = table(scores), table(once)
        assert set(repeated["style"]) == {"all", "anime", "photo"}
        for column in ("ci_low", "ci_high", "prompts"):
            assert repeated[column].values == pytest.approx(single[column].values)
    board = leaderboard(scores)
    assert set(board.shared_items[board["style"] == "all"]) == {160}


def test_compare_accuracy_intervals_count_prompts_not_pairs(shapes_pairs):
    repeated = pd.concat([shapes_pairs] * 4, ignore_index=True)  # each pair 4 times over: still 24 prompts' worth
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.3, 0.02, 24), rng.normal(0.3, 0.02, 24)
    tables = [comparison_table([read_source(pairs)], {"x": [{"pos": list(np.tile(pos, k)), "neg": list(np.tile(neg, k)),
                                                             "groups": None, "softmax_scale": 100.0}]})
              for pairs, k in ((shapes_pairs, 1), (repeated, 4))]
    assert tables[1].pairs.item() == 96 and tables[1].prompts.item() == tables[0].prompts.item()
    assert tables[1][["accuracy", "ci_low", "ci_high"]].values == pytest.approx(
        tables[0][["accuracy", "ci_low", "ci_high"]].values)


def test_a_calibration_file_is_read_only_for_the_scorer_and_weights_it_was_fitted_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    write_calibration(calibration_entries({"ours": {"temperature": 3.0, "nll": 0.5, "ece": 0.01, "pairs": 10,
                                                    "held_out_pairs": 3, "bins": []}}, {"ours": "clip:a.pth"}),
                      "calibration.json")
    assert read_calibration("calibration.json", f"clip:{tmp_path / 'sub' / '..' / 'a.pth'}")["temperature"] == 3.0
    with pytest.raises(InputError, match=r"calibration.json: fitted for another scorer: it holds ours=clip:.*a\.pth "
                                         r"\(weights \w+\), not clip:.*b\.pth"):
        read_calibration("calibration.json", "clip:b.pth")
    os.utime(tmp_path / "a.pth", (1, 1))
    with pytest.raises(InputError, match="with other weights .* changed since"):
        read_calibration("calibration.json", "clip:a.pth")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="bad.json: not a calibration file"):
        read_calibration("bad.json", "clip:a.pth")


def test_compare_calibrate_then_score_with_the_file_end_to_end(shapes_pairs, tiny_init, tmp_path, capsys):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    spec = f"clip:{tiny_init},model={TINY_CLIP}"
    compare([str(tmp_path / "pairs.parquet")], {"ours": spec}, str(tmp_path / "out"), device="cpu", num_workers=0,
            calibrate=True)
    entry = json.load(open(tmp_path / "out" / "calibration.json"))["ours"]
    assert {"temperature", "nll", "ece", "pairs", "held_out_pairs", "spec", "weights"} <= set(entry)
    assert f"ours: temperature {entry['temperature']:.4g} from {entry['pairs']} pairs" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "calibration.png") as picture:
        assert picture.size[0] > 300
    # validate.py fits the same temperature on the same pairs
    fit = evaluate_source(str(tmp_path / "pairs.parquet"), device="cpu", num_workers=0, scorer=spec,
                          calibrate_to=str(tmp_path / "v.json"))["calibration"]
    assert fit["temperature"] == pytest.approx(entry["temperature"], rel=1e-5)
    images, calibration = shapes_pairs.pos_path.tolist()[:3], str(tmp_path / "out" / "calibration.json")
    with pytest.raises(InputError, match="--reference other.png: not among the images scored"):
        rank_images("x", images, scorer=spec, calibration=calibration, reference="other.png")
    scored = run_script("scripts/score.py", "--prompt", shapes_pairs.prompt[0], *images, "--scorer", spec, "--calibration",
                        calibration, "--reference", images[1], "--device", "cpu")
    assert scored.returncode == 0, scored.stderr[-2000:]
    lines = scored.stdout.splitlines()
    assert len(lines) == 3 and all(f"P(beats {images[1]})" in line for line in lines)
    assert [line for line in lines if line.endswith(images[1])][0].split()[-2] == "0.500"
