import json
import os
import random

import datasets
import pandas as pd
import pytest
from conftest import TINY_CLIP
from conftest import run_script as run_in_process

from social_reward.scoring.best_of_n import best_of_n
from social_reward.synthetic.shapes import draw
from social_reward.scoring.ranking import rank_images

PROMPTS = {"two red circles": ("two", "red", "circle"), "one blue square": ("one", "blue", "square")}


@pytest.fixture
def candidates(tmp_path):
    """Four candidates per prompt, of which one draws the prompt, written as PNGs; the table as generate.py writes it."""
    rng = random.Random(0)
    rows = []
    for p, (prompt, scene) in enumerate(PROMPTS.items()):
        for k in range(4):
            drawn = scene if k == 2 else ("three", "green", "triangle")
            path = str(tmp_path / "candidates" / f"{p}_{k}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            draw(*drawn, rng).save(path)
            rows.append({"generator": "sd", "prompt": prompt, "sample": k, "image": path})
    return pd.DataFrame(rows)


def by_hand(candidates, weights):
    scores = []
    for prompt, group in candidates.groupby("prompt", sort=False):
        ranking = rank_images(prompt, list(group.image), checkout_path=weights, model=TINY_CLIP, device="cpu")
        scores += [(prompt, path, score) for path, score in zip(ranking.path, ranking.score)]
    return pd.DataFrame(scores, columns=["prompt", "image", "score"])


def read_metadata(folder):
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_keeps_each_prompts_top_k_as_score_py_ranks_them_in_an_image_folder(candidates, tiny_init, tmp_path):
    out = str(tmp_path / "best")
    result = best_of_n(candidates, f"clip:{tiny_init},model={TINY_CLIP}", top_k=2, out=out, device="cpu")
    expected = by_hand(candidates, tiny_init)
    kept = read_metadata(out)
    assert len(kept) == 4 and sorted(os.listdir(out)) == sorted(["metadata.jsonl"] + [m["file_name"] for m in kept])
    for prompt in PROMPTS:
        best_two = expected[expected.prompt == prompt].head(2)
        ours = [m for m in kept if m["text"] == prompt]
        assert [m["score"] for m in ours] == pytest.approx(list(best_two.score), abs=1e-5)
        for m, source in zip(ours, best_two.image):  # hard-linked: the same file
            assert os.path.samefile(os.path.join(out, m["file_name"]), source)
    assert result["mean_all"] == pytest.approx(expected.score.mean(), abs=1e-5)
    assert result["mean_kept"] == pytest.approx(sum(m["score"] for m in kept) / 4, abs=1e-6)
    assert result["mean_kept"] >= result["mean_all"]


def test_the_folder_loads_as_a_hugging_face_image_folder(candidates, tiny_init, tmp_path):
    out = str(tmp_path / "best")
    best_of_n(candidates, f"clip:{tiny_init},model={TINY_CLIP}", top_k=1, out=out, device="cpu")
    loaded = datasets.load_dataset("imagefolder", data_dir=out, split="train")
    assert sorted(loaded["text"]) == sorted(PROMPTS) and loaded[0]["image"].size == (64, 64)


def test_image_bytes_are_written_as_files(candidates, tiny_init, tmp_path):
    as_bytes = candidates.assign(image=[open(p, "rb").read() for p in candidates.image])
    out = str(tmp_path / "best")
    best_of_n(as_bytes, f"clip:{tiny_init},model={TINY_CLIP}", top_k=1, out=out, device="cpu")
    names = [m["file_name"] for m in read_metadata(out)]
    assert names == ["000000.png", "000001.png"]
    assert all(os.path.getsize(os.path.join(out, n)) > 0 for n in names)


def test_a_top_k_above_a_prompts_candidates_keeps_them_all_and_says_which(candidates, tiny_init, tmp_path, capsys):
    fewer = candidates.drop(index=[0, 1])  # "two red circles" has two candidates left
    best_of_n(fewer, f"clip:{tiny_init},model={TINY_CLIP}", top_k=3, out=str(tmp_path / "best"), device="cpu")
    assert "1 prompts have fewer than 3 candidates and keep them all: 'two red circles'" in capsys.readouterr().out
    assert len(read_metadata(tmp_path / "best")) == 2 + 3


def run_script(*args):
    return run_in_process("scripts/best_of_n.py", *args, "--device", "cpu")


def test_bad_input_ends_in_one_line_and_writes_nothing(candidates, tiny_init, tmp_path):
    table = tmp_path / "candidates.parquet"
    candidates.to_parquet(table)
    spec = f"clip:{tiny_init},model={TINY_CLIP}"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    no_prompt = tmp_path / "no_prompt.csv"
    candidates.drop(columns="prompt").to_csv(no_prompt, index=False)
    for args, expected in [
        ([str(table), "--out", str(taken)], f"--out {taken}: holds other files (mine.txt); pass --overwrite"),
        ([str(no_prompt), "--out", str(tmp_path / "a")], "no column 'prompt' (found: generator, sample, image)"),
        ([str(table), "--out", str(tmp_path / "b"), "--top_k", "0"], "--top_k must be at least 1 (got 0)"),
    ]:
        result = run_script(*args, "--scorer", spec)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-1500:]
        assert expected in result.stderr
    assert os.listdir(taken) == ["mine.txt"] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = run_script(str(table), "--out", str(taken), "--overwrite", "--scorer", spec)
    assert result.returncode == 0, result.stderr[-1500:]
    assert "mean score:" in result.stdout and "over the 2 kept" in result.stdout
    assert "mine.txt" not in os.listdir(taken) and len(read_metadata(taken)) == 2


def test_overwrite_never_replaces_the_folder_the_candidates_come_from(candidates, tiny_init, tmp_path):
    table = tmp_path / "candidates" / "candidates.parquet"
    candidates.to_parquet(table)
    before = sorted(os.listdir(tmp_path / "candidates"))
    result = run_script(str(table), "--out", str(tmp_path / "candidates"), "--overwrite", "--scorer",
                        f"clip:{tiny_init},model={TINY_CLIP}")
    assert result.returncode == 2 and "which writing it would replace" in result.stderr, result.stderr[-1500:]
    assert sorted(os.listdir(tmp_path / "candidates")) == before


def test_an_image_given_twice_for_a_prompt_is_kept_once(candidates, tiny_init, tmp_path, capsys):
    twice = pd.concat([candidates, candidates.iloc[[0]].assign(sample=4)], ignore_index=True)
    best_of_n(twice, f"clip:{tiny_init},model={TINY_CLIP}", top_k=4, out=str(tmp_path / "best"), device="cpu")
    assert "1 candidates repeat an image" in capsys.readouterr().out
    kept = read_metadata(tmp_path / "best")
    assert len(kept) == 8 and len({(m["text"], m["score"]) for m in kept}) == 8
