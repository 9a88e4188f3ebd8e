import json
import os
import random

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_CLIP
from conftest import run_script as run_in_process
from PIL import Image

from social_reward.scoring import kept as kept_scores
from social_reward.errors import InputError
from social_reward.synthetic.shapes import COLOURS, COUNTS, SHAPES, draw, prompt_for
from social_reward.scoring.leaderboard import evaluate_generators
from social_reward.scoring.intervals import wilson_interval
from social_reward.scoring.ranking import rank_images

SCENES = [(n, c, s) for n in COUNTS for c in list(COLOURS)[:3] for s in SHAPES[:2]][:6]


def hps_world(root, generators={"faithful": 1.0, "sloppy": 0.0}, samples=2):
    """HPS v2's layout (ROOT/<generator>/<style>/<index:05d>.jpg and PROMPTS/<style>.json) for two styles, each generator
    drawing its prompt's scene with its own probability, and the same generations as a table."""
    prompts_dir = os.path.join(root, "prompts")
    os.makedirs(prompts_dir)
    styles = {"anime": SCENES[:3], "photo": SCENES[3:]}
    rows = []
    for style, scenes in styles.items():
        listed = [prompt_for(*scene) for scene in scenes]
        with open(os.path.join(prompts_dir, f"{style}.json"), "w") as f:
            json.dump(listed, f)
        for g, (generator, rate) in enumerate(generators.items()):
            rng = random.Random(g)
            os.makedirs(os.path.join(root, "images", generator, style))
            for index, scene in enumerate(scenes):
                drawn = scene if rng.random() < rate else rng.choice([s for s in SCENES if s != scene])
                path = os.path.join(root, "images", generator, style, f"{index:05d}.jpg")
                draw(*drawn, rng).save(path, quality=95)
                rows.append({"generator": generator, "style": style, "prompt": listed[index], "image": path})
    return os.path.join(root, "images"), prompts_dir, pd.DataFrame(rows)


@pytest.fixture
def world(tmp_path):
    return hps_world(str(tmp_path / "world"))


def scorer_spec(weights):
    return f"clip:{weights},model={TINY_CLIP}"


def test_leaderboard_and_win_rates_are_score_py_scores_computed_by_hand(world, tiny_init, tmp_path):
    images, prompts, table = world
    board, rates = evaluate_generators([table], {"ours": scorer_spec(tiny_init)}, str(tmp_path / "out"),
                                       device="cpu", num_workers=0)
    by_hand = {}
    for row in table.itertuples():
        by_hand[row.image] = rank_images(row.prompt, [row.image], checkout_path=tiny_init, model=TINY_CLIP,
                                         device="cpu").score[0]
    table["score"] = table.image.map(by_hand)
    for generator, group in table.groupby("generator"):
        row = board[(board.generator == generator) & (board["style"] == "all")].iloc[0]
        assert row.images == 6 and row["mean"] == pytest.approx(group.score.mean(), abs=1e-6)
        half = 1.96 * group.score.std(ddof=1) / np.sqrt(6)
        assert (row.ci_low, row.ci_high) == pytest.approx((group.score.mean() - half, group.score.mean() + half), abs=1e-6)
        for style, part in group.groupby("style"):
            styled = board[(board.generator == generator) & (board["style"] == style)].iloc[0]
            assert styled["mean"] == pytest.approx(part.score.mean(), abs=1e-6)
    faithful = table[table.generator == "faithful"].set_index(["style", "prompt"]).score
    sloppy = table[table.generator == "sloppy"].set_index(["style", "prompt"]).score
    wins = (faithful > sloppy).sum() + 0.5 * (faithful == sloppy).sum()
    row = rates[(rates.generator == "faithful") & (rates.other == "sloppy")].iloc[0]
    assert row["items"] == 6 and (row.win_rate, row.ci_low, row.ci_high) == pytest.approx(wilson_interval(wins, 6))
    other_way = rates[(rates.generator == "sloppy") & (rates.other == "faithful")].iloc[0]
    assert other_way.win_rate == pytest.approx(1 - row.win_rate)
    written = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert list(written.columns) == ["scorer", "generator", "style", "prompt", "sample", "image", "score"]
    assert sorted(written.score) == pytest.approx(sorted(table.score), abs=1e-6)
    assert "**" in open(tmp_path / "out" / "leaderboard.md").read()
    with Image.open(tmp_path / "out" / "generators.png") as picture:
        assert picture.size == (2 * 192, 4 * (34 + 192 + 24))


def test_the_hps_layout_and_the_table_give_the_same_numbers(world, tiny_init, tmp_path):
    images, prompts, table = world
    scorers = {"ours": scorer_spec(tiny_init)}
    from_folders = evaluate_generators([images], scorers, str(tmp_path / "a"), prompts=prompts, device="cpu")
    table_file = tmp_path / "generations.csv"
    table.assign(image=[os.path.relpath(p, tmp_path) for p in table.image]).to_csv(table_file, index=False)
    from_table = evaluate_generators([str(table_file)], scorers, str(tmp_path / "b"), device="cpu")
    for a, b in zip(from_folders, from_table):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_a_rerun_reads_the_kept_scores_and_a_new_generator_scores_only_its_images(world, tiny_init, tmp_path,
                                                                               monkeypatch, capsys):
    images, prompts, table = world
    scorers = {"ours": scorer_spec(tiny_init)}
    first = evaluate_generators([table[table.generator == "faithful"]], scorers, str(tmp_path / "out"), device="cpu")
    assert "scoring 6 (prompt, image) pairs" in capsys.readouterr().out
    both = evaluate_generators([table], scorers, str(tmp_path / "out"), device="cpu")
    assert "scoring 6 (prompt, image) pairs" in capsys.readouterr().out  # sloppy's six only
    monkeypatch.setattr(kept_scores, "load_scorer", lambda *a, **k: pytest.fail("a rerun loaded the scorer"))
    again = evaluate_generators([table], scorers, str(tmp_path / "out"), device="cpu")
    pd.testing.assert_frame_equal(both[0], again[0])
    kept_faithful = again[0][again[0].generator == "faithful"].reset_index(drop=True)
    pd.testing.assert_frame_equal(first[0], kept_faithful[first[0].columns])  # less the shared items' columns


def test_items_are_compared_only_where_both_generators_have_them(world, tiny_init, tmp_path, capsys):
    images, prompts, table = world
    os.remove(os.path.join(images, "sloppy", "photo", "00001.jpg"))
    board, rates = evaluate_generators([images], {"ours": scorer_spec(tiny_init)}, str(tmp_path / "out"),
                                       prompts=prompts, device="cpu")
    out = capsys.readouterr().out
    assert "sloppy/photo: 1 of 3 prompts have no image" in out
    assert "sloppy: lacks 1 items the other generators have" in out
    assert set(rates[rates["style"] == "all"]["items"]) == {5}
    assert set(rates[rates["style"] == "photo"]["items"]) == {2}
    overall = board[board["style"] == "all"].set_index("generator")
    assert list(overall.images) == [6, 5] and set(overall.shared_items) == {5}
    assert "Means over the 5 items every generator has" in open(tmp_path / "out" / "leaderboard.md").read()


def run_script(*args):
    return run_in_process("scripts/evaluate_generators.py", *args, "--device", "cpu")


def test_bad_generations_end_in_one_line_naming_the_culprit(world, tiny_init, tmp_path):
    images, prompts, table = world
    spec = f"ours={scorer_spec(tiny_init)}"
    cases = []
    os.makedirs(os.path.join(images, "empty", "anime"))
    cases.append(([images, "--prompts", prompts], f"{os.path.join(images, 'empty', 'anime')}: no images"))
    no_columns = tmp_path / "no_columns.csv"
    table.rename(columns={"image": "path"}).to_csv(no_columns, index=False)
    cases.append(([str(no_columns)], "no column 'image' (found: generator, style, prompt, path)"))
    other = tmp_path / "other"
    os.makedirs(other)
    (other / "notes.txt").write_text("mine")
    cases.append(([str(no_columns), "--out", str(other)], "holds other files (notes.txt)"))
    for args, expected in cases:
        result = run_script(*args, "--scorer", spec, *([] if "--out" in args else ["--out", str(tmp_path / "o")]))
        assert result.returncode == 2, result.stderr[-1500:]
        assert result.stderr.strip().splitlines() == [f"error: {expected}"] or expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (other / "notes.txt").read_text() == "mine" and os.listdir(other) == ["notes.txt"]


def test_an_index_without_a_prompt_is_named(world, tiny_init, tmp_path):
    images, prompts, table = world
    extra = os.path.join(images, "faithful", "anime", "00007.jpg")
    Image.new("RGB", (8, 8)).save(extra)
    with pytest.raises(InputError, match=r"00007.jpg: index 7 has no prompt \(anime.json lists 3\)"):
        evaluate_generators([images], {"ours": scorer_spec(tiny_init)}, str(tmp_path / "out"), prompts=prompts)


def test_unreadable_images_are_named_or_skipped_and_counted(world, tiny_init, tmp_path, capsys):
    images, prompts, table = world
    broken = os.path.join(images, "sloppy", "anime", "00002.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    scorers = {"ours": scorer_spec(tiny_init)}
    with pytest.raises(InputError, match=r"sloppy/anime, sample 0 of '.*': .*00002.jpg: cannot read image"):
        evaluate_generators([images], scorers, str(tmp_path / "a"), prompts=prompts, device="cpu")
    board, _ = evaluate_generators([images], scorers, str(tmp_path / "b"), prompts=prompts, device="cpu",
                                   skip_bad_images=True)
    assert "skipping 1 unreadable images" in capsys.readouterr().err
    assert board[(board.generator == "sloppy") & (board["style"] == "all")].images.item() == 5


def test_table_mistakes_in_sample_and_image_name_the_row(world, tiny_init, tmp_path):
    images, prompts, table = world
    with pytest.raises(InputError, match=r"the DataFrame: row 3: 'sample' is 'nan', not a whole number >= 0"):
        evaluate_generators([table.assign(sample=[0, 1, 2, np.nan] + [0] * (len(table) - 4))],
                            {"ours": scorer_spec(tiny_init)}, str(tmp_path / "a"))
    with pytest.raises(InputError, match=r"the DataFrame: row 0: no such image file .*gone.png"):
        evaluate_generators([table.assign(image=[str(tmp_path / "gone.png")] + list(table.image[1:]))],
                            {"ours": scorer_spec(tiny_init)}, str(tmp_path / "b"))


def test_a_prompt_listed_twice_pairs_its_samples_by_place_and_hidden_folders_are_ignored(tmp_path, tiny_init):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "anime.json").write_text(json.dumps(["two red circles", "one blue square", "two red circles"]))
    for generator, indices in (("a", [0, 1, 2]), ("b", [1, 2])):
        os.makedirs(tmp_path / "images" / generator / "anime")
        for index in indices:
            draw("two", "red", "circle", random.Random(index)).save(tmp_path / "images" / generator / "anime" / f"{index:05d}.jpg")
    os.makedirs(tmp_path / "images" / ".ipynb_checkpoints")
    from social_reward.data.generations import read_generations
    generations = read_generations([str(tmp_path / "images")], str(prompts))
    b_third = generations[(generations.generator == "b") & generations.image.str.endswith("00002.jpg")].iloc[0]
    assert b_third["sample"] == 1  # the prompt's second place in the list, whatever images exist
    assert set(generations.generator) == {"a", "b"}
