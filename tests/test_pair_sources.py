import io
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage
import torch
from conftest import TINY_CLIP, run_script
from PIL import Image

from social_reward.models.clip import load_model
from data_set import PromptImagePair
from social_reward.scoring.metrics import hpd_ranking_accuracy, imagereward_accuracy, pickapic_accuracy
from social_reward.data.sources import read_source
from train_pair_pos_neg import finetune_model
from social_reward.scoring.encoding import pair_scores
from social_reward.scoring.validation import evaluate_source
from validate import validate_image_pair_classifier

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png",
          "coins.png", "moon.png"]


@pytest.fixture
def photos(tmp_path):
    """Eight of scikit-image's photographs as encoded bytes, JPEG and WebP in turn, and the same bytes as files."""
    folder = tmp_path / "photos"
    folder.mkdir()
    encoded = {}
    for i, name in enumerate(PHOTOS):
        with Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)) as image:
            image = image.convert("RGB").resize((96, 72))
        fmt = "JPEG" if i % 2 == 0 else "WEBP"
        buffer = io.BytesIO()
        image.save(buffer, fmt, quality=90)
        path = folder / f"{i}.{fmt.lower()}"
        path.write_bytes(buffer.getvalue())
        encoded[str(path)] = buffer.getvalue()
    return encoded


# (caption, image 0, image 1, label_0, label_1, has_label): images by their index in PHOTOS
PICKAPIC_ROWS = [
    ("an astronaut", 0, 1, 1.0, 0.0, True),
    ("a ginger cat", 2, 1, 0.0, 1.0, True),
    ("a cup of coffee", 2, 3, 1.0, 0.0, True),
    ("a rocket", 4, 3, 0.0, 1.0, True),
    ("a tie between two", 4, 5, 0.5, 0.5, True),  # a tie
    ("deep space", 4, 5, 1.0, 0.0, True),
    ("not labelled yet", 6, 7, 0.0, 0.0, False),  # unlabeled
    ("old coins", 6, 7, 1.0, 0.0, True),
    ("the moon", 7, 0, 0.0, 1.0, True),
    ("another tie", 0, 2, 0.5, 0.5, True),  # a tie
]


def pickapic_table(photos, rows=PICKAPIC_ROWS):
    data = list(photos.values())
    return pa.table({
        "are_different": [True] * len(rows), "best_image_uid": [""] * len(rows),
        "caption": [r[0] for r in rows], "has_label": [r[5] for r in rows],
        "image_0_uid": [f"uid{r[1]}" for r in rows], "image_1_uid": [f"uid{r[2]}" for r in rows],
        "jpg_0": pa.array([data[r[1]] for r in rows], pa.binary()), "jpg_1": pa.array([data[r[2]] for r in rows], pa.binary()),
        "label_0": [r[3] for r in rows], "label_1": [r[4] for r in rows],
        "model_0": ["sdxl"] * len(rows), "model_1": ["sd15"] * len(rows),
    })


def write_pickapic(photos, path, rows=PICKAPIC_ROWS, row_group_size=3):
    pq.write_table(pickapic_table(photos, rows), path, row_group_size=row_group_size)
    return str(path)


def as_files(photos, rows=PICKAPIC_ROWS):
    """The decided Pick-a-Pic rows as the original's table of image paths."""
    paths = list(photos)
    return pd.DataFrame([(c, paths[a], paths[b]) if l0 > l1 else (c, paths[b], paths[a])
                         for c, a, b, l0, l1, labelled in rows if labelled and l0 != l1],
                        columns=["prompt", "pos_path", "neg_path"])


def test_pickapic_rows_become_pairs_leaving_out_ties_and_unlabeled_rows(photos, tmp_path):
    source = read_source(write_pickapic(photos, tmp_path / "test-00000-of-00001.parquet"))
    assert source.layout == "pickapic" and len(source.pairs) == 7
    assert source.left_out == "left out 3 of 10 rows: 2 ties (label_0 == label_1), 1 unlabeled (has_label false or no label)"
    assert list(source.pairs.prompt) == list(as_files(photos).prompt)
    assert len(source.groups) == 9  # the metric keeps the ties, not the unlabeled row


def test_validate_on_a_pickapic_shard_equals_the_same_pairs_as_image_files(photos, tmp_path, tiny_init):
    shard = write_pickapic(photos, tmp_path / "shard.parquet")
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    from_shard = pair_scores(model, preprocess, tokenizer, read_source(shard).pairs, "cpu", progress=False)
    from_files = pair_scores(model, preprocess, tokenizer, as_files(photos), "cpu", progress=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(from_shard, from_files))
    assert (validate_image_pair_classifier(shard, tiny_init, "cpu", num_workers=0, model=TINY_CLIP)
            == validate_image_pair_classifier(as_files(photos), tiny_init, "cpu", num_workers=0, model=TINY_CLIP))


def test_shards_are_read_as_a_list_a_glob_or_a_folder(photos, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_pickapic(photos, folder / "test-00000-of-00002.parquet", PICKAPIC_ROWS[:5])
    write_pickapic(photos, folder / "test-00001-of-00002.parquet", PICKAPIC_ROWS[5:])
    whole = read_source(write_pickapic(photos, tmp_path / "whole.parquet")).pairs
    for source in (str(folder), str(folder / "test-*.parquet"), sorted(map(str, folder.iterdir()))):
        pairs = read_source(source).pairs
        assert list(pairs.prompt) == list(whole.prompt) and len(pairs) == 7


def test_each_distinct_image_of_a_shard_is_decoded_once_also_from_worker_processes(photos, tmp_path, tiny_init):
    source = read_source(write_pickapic(photos, tmp_path / "shard.parquet"))
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    opened = []
    pair_scores(model, lambda image: opened.append(image.tobytes()[:64]) or preprocess(image), tokenizer, source.pairs,
                "cpu", progress=False)
    used = {i for c, a, b, l0, l1, labelled in PICKAPIC_ROWS if labelled and l0 != l1 for i in (a, b)}
    assert len(opened) == len(set(opened)) == len(used)
    in_workers = pair_scores(model, preprocess, tokenizer, source.pairs, "cpu", num_workers=2, progress=False)
    in_process = pair_scores(model, preprocess, tokenizer, source.pairs, "cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_process))


def test_a_table_with_image_bytes_gives_the_items_of_the_table_of_paths(photos, tmp_path):
    paths = as_files(photos)
    with_bytes = pd.DataFrame({"prompt": paths.prompt, "pos_image": paths.pos_path.map(photos),
                               "neg_image": paths.neg_path.map(photos)})
    with_bytes.to_parquet(tmp_path / "bytes.parquet")
    preprocess = load_model(TINY_CLIP, pretrained="none")[1]
    expected = PromptImagePair(paths, preprocess)[3]
    for source in (with_bytes, str(tmp_path / "bytes.parquet")):
        assert all(torch.equal(a, b) for a, b in zip(PromptImagePair(source, preprocess)[3], expected))


def test_pickapic_accuracy_equals_a_hand_computation_with_ties():
    scores = [(0.3, 0.2), (0.1, 0.4), (0.2, 0.2), (0.5, 0.1)]
    labels = [(1, 0), (1, 0), (0.5, 0.5), (0.5, 0.5)]
    # threshold 0: right, wrong, tie predicted on a tie, a tie label against a prediction: 1 + 0 + 1 + 0.5
    assert pickapic_accuracy(scores, labels, logit_scale=100, tie_threshold=0) == 2.5 / 4
    # at scale 1 the probabilities differ by tanh(d / 2): 0.050, 0.149, 0, 0.197; threshold 0.1 makes row 0 a tie
    assert pickapic_accuracy(scores, labels, logit_scale=1, tie_threshold=0.1) == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)


SCORES = [[0.9, 0.5, 0.7], [0.1, 0.3, 0.2, 0.4], [0.5, 0.5], [0.2, 0.6]]
RANKS = [[1, 3, 2], [1, 1, 2, 3], [2, 1], [1, 1]]


def test_hpd_ranking_accuracy_equals_a_hand_computation_with_ties():
    # positions by score: [0, 2, 1] (all concordant); [3, 1, 2, 0]: 4 of 6 pairs discordant, the tied pair not;
    # equal scores keep the listed order: [0, 1] against ranks [2, 1] is discordant; all-tied ranks: nothing discordant
    assert hpd_ranking_accuracy(SCORES, RANKS) == pytest.approx((1 + (1 - 4 / 6) + 0 + 1) / 4)


def test_imagereward_accuracy_equals_a_hand_computation_with_ties():
    # 3 of 3; 1 of the 5 pairs with different ranks; equal scores count as wrong; all-tied ranks: left out
    assert imagereward_accuracy(SCORES, RANKS) == pytest.approx((1 + 1 / 5 + 0) / 3)


def ranked_json(photos, tmp_path, layout):
    """A small HPD v2 train/test or ImageReward json over the photos, with equal ranks in the second entry."""
    names = [os.path.basename(p) for p in photos]
    images_key, ranks_key = {"hpdv2_train": ("file_path", "human_preference"), "hpdv2_test": ("image_path", "rank"),
                             "imagereward": ("generations", "ranking")}[layout]
    if layout == "hpdv2_train":
        entries = [([0, 1], [1, 0]), ([2, 3], [0, 1]), ([4, 5], [0, 0]), ([6, 7], [1, 0])]
    else:
        entries = [([0, 1, 2], [1, 3, 2]), ([3, 4, 5, 6], [1, 1, 2, 3]), ([7, 0], [2, 1])]
    data = [{"prompt": f"prompt {i}", images_key: [names[j] for j in images], ranks_key: ranks}
            for i, (images, ranks) in enumerate(entries)]
    path = tmp_path / f"{layout}.json"
    path.write_text(json.dumps(data))
    return str(path), str(tmp_path / "photos")


@pytest.mark.parametrize("layout, pairs, left_out", [("hpdv2_train", 3, 1), ("hpdv2_test", 3 + 5 + 1, 1),
                                                     ("imagereward", 3 + 5 + 1, 1)])
def test_ranked_lists_become_every_pair_with_different_ranks(layout, pairs, left_out, photos, tmp_path):
    path, root = ranked_json(photos, tmp_path, layout)
    source = read_source(path, image_root=root)
    assert source.layout == layout and len(source.pairs) == pairs
    assert source.left_out == f"left out {left_out} image pairs with equal ranks"
    first = source.pairs.iloc[0]
    assert first.prompt == "prompt 0" and first.pos_path.endswith("0.jpeg") and first.neg_path.endswith("1.webp")


def run_validate(*args):
    return run_script("validate.py", *args, "--model", TINY_CLIP, "--device", "cpu")


@pytest.mark.parametrize("layout, line, metric", [
    ("pickapic", "Pick-a-Pic accuracy", None), ("hpdv2_test", "HPD v2 ranking accuracy", hpd_ranking_accuracy),
    ("imagereward", "ImageReward accuracy", imagereward_accuracy)])
def test_the_cli_prints_the_original_accuracy_and_the_benchmarks_own_metric(layout, line, metric, photos, tmp_path,
                                                                             tiny_init):
    if layout == "pickapic":
        source, options = write_pickapic(photos, tmp_path / "shard.parquet"), {"tie_threshold": 0.3}
    else:
        source, root = ranked_json(photos, tmp_path, layout)
        options = {"image_root": root}
    flags = [str(x) for option, value in options.items() for x in (f"--{option}", value)]
    result = run_validate(source, "--checkout_path", tiny_init, "--scores_out", str(tmp_path / "scores.csv"), *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = pd.read_csv(tmp_path / "scores.csv")
    expected = evaluate_source(source, tiny_init, "cpu", num_workers=0, model=TINY_CLIP, **options)
    per_entry = scores.groupby("entry", sort=False).score.apply(list).tolist()
    if layout == "pickapic":  # every labelled row's two images, with their labels
        labels = scores.groupby("entry", sort=False).label.apply(list).tolist()
        value = pickapic_accuracy(per_entry, labels, load_model(TINY_CLIP, checkout_path=tiny_init)[0].logit_scale.exp().item(), 0.3)
        assert len(scores) == 2 * 9
    else:
        value = metric(per_entry, scores.groupby("entry", sort=False)["rank"].apply(list).tolist())
    assert value == pytest.approx(expected["metric"][1])
    threshold = " (tie threshold 0.3)" if layout == "pickapic" else ""
    assert result.stdout == f"Accuracy: {expected['accuracy'] * 100:.2f}%\n{line}: {value * 100:.2f}%{threshold}\n"
    assert "left out" in result.stderr


def test_training_on_a_pickapic_shard_ends_on_the_weights_of_training_on_the_same_pairs_as_files(photos, tmp_path,
                                                                                                 tiny_init):
    shard = write_pickapic(photos, tmp_path / "shard.parquet")
    common = dict(training_mode="visual_upper_layers", batch_size=2, n_epochs=2, checkout_path=tiny_init,
                  learning_rate=1e-3, model=TINY_CLIP, num_workers=0)
    # the files' order: a shard's default block order would give the same pairs in other batches
    from_shard = finetune_model([shard], save_folder=str(tmp_path / "shard_run"), shuffle="uniform", **common)
    from_files = finetune_model(as_files(photos), save_folder=str(tmp_path / "files_run"), **common)
    a, b = torch.load(from_shard, weights_only=True), torch.load(from_files, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in torch.load(tiny_init, weights_only=True).items())


def test_training_reads_an_hpd_v2_train_json_directly(photos, tmp_path, tiny_init):
    path, root = ranked_json(photos, tmp_path, "hpdv2_train")
    result = run_script("train_pair_pos_neg.py", "--training_file", path, "--image_root", root, "--training_mode",
                        "visual_last_layer", "--batch_size", "2", "--n_epochs", "1", "--save_folder",
                        str(tmp_path / "run"), "--model", TINY_CLIP, "--checkout_path", tiny_init, "--num_workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out 1 image pairs with equal ranks" in result.stdout
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("clip_")) == [
        "clip_epoch_0_global_step_2.pth", "clip_epoch_0_global_step_final.pth"]


def bad_source(case, photos, tmp_path):
    """A source with one mistake in it; returns the arguments for validate.py and what the error line must name."""
    if case == "no layout":
        pd.DataFrame({"text": ["a"], "image": [b"x"]}).to_parquet(tmp_path / "other.parquet")
        return [str(tmp_path / "other.parquet")], "other.parquet: not a layout understood (columns: text, image)"
    if case in ("null cell", "empty cell", "undecodable cell"):
        table = pickapic_table(photos).to_pandas()
        table.at[3, "jpg_0"] = {"null cell": None, "empty cell": b"", "undecodable cell": b"not an image"}[case]
        path = tmp_path / "shard.parquet"
        table.to_parquet(path, row_group_size=3)
        expected = {"null cell": f"{path}: row 3, column 'jpg_0': the image cell is null",
                    "empty cell": f"{path}, row 3, column 'jpg_0': cannot read image (ValueError: empty image bytes)",
                    "undecodable cell": f"{path}, row 3, column 'jpg_0': cannot read image"}[case]
        return [str(path)], expected
    path, root = ranked_json(photos, tmp_path, "hpdv2_test")
    entries = json.loads(open(path).read())
    if case == "json not a list":
        entries = {"prompt": "x"}
        expected = "hpdv2_test.json: expected a list of objects (one per prompt), got dict"
    elif case == "missing key":
        del entries[1]["rank"]
        expected = "hpdv2_test.json: entry 1 has no key 'rank'"
    elif case == "different lengths":
        entries[2]["rank"] = [1, 2, 3]
        expected = "hpdv2_test.json: entry 2: 2 images in 'image_path' but 3 values in 'rank'"
    elif case == "missing image":
        entries[1]["image_path"][2] = "gone.jpg"
        expected = f"hpdv2_test.json: entry 1, key 'image_path': no such image file '{os.path.join(root, 'gone.jpg')}'"
    with open(path, "w") as f:
        json.dump(entries, f)
    return [path, "--image_root", root], expected


@pytest.mark.parametrize("case", ["no layout", "null cell", "empty cell", "undecodable cell", "json not a list",
                                  "missing key", "different lengths", "missing image"])
def test_bad_sources_end_in_one_line_naming_the_file_the_row_and_the_column(case, photos, tmp_path):
    args, expected = bad_source(case, photos, tmp_path)
    result = run_validate(*args, "--pretrained", "none", "--num_workers", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def test_skip_bad_images_skips_undecodable_bytes_and_counts_them(photos, tmp_path):
    table = pickapic_table(photos).to_pandas()
    table.at[3, "jpg_0"] = b"not an image"  # image 4, also in rows 4 and 5 (by its uid)
    table.to_parquet(tmp_path / "shard.parquet", row_group_size=3)
    result = run_validate(str(tmp_path / "shard.parquet"), "--pretrained", "none", "--skip_bad_images")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"skipping pairs with unreadable images: 1 images, first: {tmp_path / 'shard.parquet'}, row 3, column "
            f"'jpg_0'; 5 pairs left, 6 of 9 benchmark rows") in result.stderr
