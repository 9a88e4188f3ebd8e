"""Scoring whose cost grows with the data: kept scores appended a part a flush, never rewritten."""
import hashlib
import os

import numpy as np
import pandas as pd
import pytest

from social_reward.scoring.kept import KeptScores, image_identity, setting_key


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"not decoded: kept scores name an image by its identity")
    return str(path)


def score_by_index(prompts):
    """The scorer's stand-in: each request's score is read off its prompt, so a wrong row shows."""
    calls = []

    def score_missing(indices, total):
        calls.append(list(indices))
        return np.array([float(prompts[i][1:]) for i in indices], dtype=np.float32), {"score_scale": 2.0,
                                                                                       "softmax_scale": 100.0}
    return score_missing, calls


def files_in(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def test_each_flush_writes_only_its_new_rows_and_the_parts_read_back_as_one(tmp_path, image):
    folder, chunk, flushes = str(tmp_path / "scores"), 200, 12
    spec = f"clip:{image}"
    written = []
    for flush in range(flushes):  # a run over more data each time: one more chunk of new prompts
        prompts = [f"p{i}" for i in range((flush + 1) * chunk)]
        kept = KeptScores(folder, "ours", spec, chunk=chunk)
        before = files_in(kept.path) if os.path.isdir(kept.path) else {}
        score_missing, calls = score_by_index(prompts)
        scores = kept.scores(prompts, [image] * len(prompts), score_missing)
        assert [len(c) for c in calls] == [chunk]  # only the new prompts are scored
        after = files_in(kept.path)
        # every earlier part is untouched, and one part more holds exactly the new rows
        assert {name: after[name] for name in before} == before and len(after) == len(before) + 1
        new_part = (set(after) - set(before)).pop()
        assert len(pd.read_parquet(os.path.join(kept.path, new_part))) == chunk
        written.append(os.path.getsize(os.path.join(kept.path, new_part)))
        assert scores.numpy().tolist() == [float(i) for i in range(len(prompts))]
    # linear: the bytes written per flush do not grow with what is kept already
    assert max(written) < 1.2 * min(written)
    again = KeptScores(folder, "ours", spec, chunk=chunk)
    assert len(again.table) == chunk * flushes and again.scales == {"score_scale": 2.0, "softmax_scale": 100.0}


def test_a_table_kept_as_one_file_by_an_older_version_is_still_read(tmp_path, image):
    folder, spec = str(tmp_path / "scores"), f"clip:{image}"
    old = pd.DataFrame({"prompt": ["p1", "p2"], "image": [image_identity(image)] * 2,
                        "score": np.array([10.0, 20.0], dtype=np.float32)})
    old.attrs["scales"] = '{"score_scale": 2.0, "softmax_scale": 100.0}'
    os.makedirs(folder)
    old.to_parquet(os.path.join(folder, f"ours-{setting_key(spec)}.parquet"))
    prompts = ["p1", "p2", "p3"]
    score_missing, calls = score_by_index(prompts)
    kept = KeptScores(folder, "ours", spec)
    assert kept.scales == {"score_scale": 2.0, "softmax_scale": 100.0}
    scores = kept.scores(prompts, [image] * 3, score_missing)
    assert calls == [[2]] and scores.tolist() == [10.0, 20.0, 3.0]  # the old file's scores, the new one scored
    assert sorted(pd.concat([old, pd.read_parquet(kept.path)]).prompt) == ["p1", "p2", "p3"]


def test_two_runs_keeping_scores_in_one_folder_at_once_lose_nothing_and_read_back(tmp_path, image):
    folder, spec = str(tmp_path / "scores"), f"clip:{image}"
    prompts = [f"p{i}" for i in range(6)]
    first, second = KeptScores(folder, "ours", spec), KeptScores(folder, "ours", spec)  # both opened before either writes
    first.scores(prompts[:4], [image] * 4, score_by_index(prompts)[0])
    second.scores(prompts[2:], [image] * 4, score_by_index(prompts[2:])[0])  # p2, p3 scored by both
    assert len(os.listdir(KeptScores(folder, "ours", spec).path)) == 2  # neither part overwrote the other
    score_missing, calls = score_by_index(prompts)
    scores = KeptScores(folder, "ours", spec).scores(prompts, [image] * 6, score_missing)
    assert calls == [] and scores.numpy().tolist() == [float(i) for i in range(6)]


def test_pickscore_scores_kept_before_its_crop_changed_are_not_reused(tmp_path):
    (tmp_path / "PickScore").mkdir()
    assert setting_key(f"pickscore:{tmp_path / 'PickScore'}") != setting_key(f"clip:{tmp_path / 'PickScore'}")
