"""Every scoring script under torchrun on two CPU processes prints and writes what one process does: each process
encodes a share of the images and prompts (encoding.across_processes), the main process alone writes and prints."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from conftest import ROOT, TINY_CLIP, run_script
from test_shard_order import write_shard

TWO_PROCESSES = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port: tests run side by side


def run(launcher, script, *args, own_process=False):
    """The script's stdout, on the launcher's processes (torchrun), or without one in this process (run_script)
    unless own_process."""
    if launcher or own_process:
        result = subprocess.run([sys.executable, *launcher, script, *map(str, args)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        result = run_script(script, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def one_and_two(script, flags, tmp_path):
    """The script's printed lines on one process and on two, each writing into its own --out (one/, two/); the two
    must print the same, their --out folders aside."""
    one = run([], script, *flags, "--out", tmp_path / "one")
    two = run(TWO_PROCESSES, script, *flags, "--out", tmp_path / "two")
    assert two.replace(str(tmp_path / "two"), "OUT") == one.replace(str(tmp_path / "one"), "OUT")
    return one


def assert_same_table(path_one, path_two):
    one, two = pd.read_csv(path_one), pd.read_csv(path_two)
    assert list(one.columns) == list(two.columns) and len(one) == len(two)
    for column in one.columns:
        if pd.api.types.is_float_dtype(one[column]):
            np.testing.assert_allclose(two[column], one[column], rtol=0, atol=1e-6)
        else:
            assert one[column].equals(two[column]), column


def test_validate_on_two_processes_prints_and_writes_what_one_does(tiny_init, tmp_path):
    shards = [write_shard(tmp_path / "a.parquet", 0, 10, 4), write_shard(tmp_path / "b.parquet", 10, 7, 3)]
    flags = ["--model", TINY_CLIP, "--pretrained", "none", "--checkout_path", tiny_init, "--device", "cpu"]
    one = run([], "validate.py", *shards, *flags, "--scores_out", tmp_path / "one.csv")
    two = run(TWO_PROCESSES, "validate.py", *shards, *flags, "--scores_out", tmp_path / "two.csv")
    assert "Pick-a-Pic accuracy" in one and two == one
    assert_same_table(tmp_path / "one.csv", tmp_path / "two.csv")  # every image's score, 34 images in shares of 17


def test_score_on_two_processes_prints_and_writes_the_ranking_one_does(shapes_pairs, tiny_init, tmp_path):
    images = list(shapes_pairs.pos_path[:7]) + list(shapes_pairs.neg_path[:6])  # 13 images: shares of 6 and 7
    flags = ["--prompt", "three blue squares", *images, "--model", TINY_CLIP, "--pretrained", "none",
             "--checkout_path", tiny_init, "--device", "cpu"]
    one = run([], "score.py", *flags, "--output", tmp_path / "one.csv")
    two = run(TWO_PROCESSES, "score.py", *flags, "--output", tmp_path / "two.csv")
    assert len(one.splitlines()) == 13 and two == one
    assert_same_table(tmp_path / "one.csv", tmp_path / "two.csv")


def test_compare_on_two_processes_keeps_and_writes_what_one_does(shapes_pairs, tiny_init, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    flags = [tmp_path / "pairs.parquet", "--scorer", f"a=clip:{tiny_init},model={TINY_CLIP}", "--device", "cpu"]
    assert "a: scoring" in one_and_two("compare.py", flags, tmp_path)
    for name in ("table.csv", "agreement.csv"):
        assert_same_table(tmp_path / "one" / name, tmp_path / "two" / name)
    assert (tmp_path / "one" / "table.md").read_text() == (tmp_path / "two" / "table.md").read_text()
    # the kept scores: written by the main process alone, a part a flush
    kept_one, kept_two = (sorted(os.listdir(tmp_path / out / "scores")) for out in ("one", "two"))
    assert kept_one == kept_two and len(kept_two) == 1
    scores_one, scores_two = (pd.read_parquet(tmp_path / out / "scores" / kept_one[0]) for out in ("one", "two"))
    assert scores_one.prompt.equals(scores_two.prompt) and scores_one.image.equals(scores_two.image)
    np.testing.assert_allclose(scores_two.score, scores_one.score, rtol=0, atol=1e-6)
    assert not list((tmp_path / "two" / "scores").glob("*.tmp"))


def test_evaluate_generators_on_two_processes_writes_what_one_does(shapes_pairs, tiny_init, tmp_path):
    generations = pd.DataFrame({"generator": ["a"] * 12 + ["b"] * 12, "prompt": list(shapes_pairs.prompt[:12]) * 2,
                                "image": list(shapes_pairs.pos_path[:12]) + list(shapes_pairs.neg_path[:12])})
    generations.to_parquet(tmp_path / "generations.parquet")
    flags = [tmp_path / "generations.parquet", "--scorer", f"ours=clip:{tiny_init},model={TINY_CLIP}", "--device", "cpu"]
    assert "ours: scoring 24" in one_and_two("evaluate_generators.py", flags, tmp_path)
    for name in ("leaderboard.csv", "winrates.csv"):
        assert_same_table(tmp_path / "one" / name, tmp_path / "two" / name)
    one_scores, two_scores = (pd.read_parquet(tmp_path / out / "scores.parquet") for out in ("one", "two"))
    np.testing.assert_allclose(two_scores.score, one_scores.score, rtol=0, atol=1e-6)


def test_best_of_n_on_two_processes_keeps_what_one_does(shapes_pairs, tiny_init, tmp_path):
    candidates = pd.DataFrame({"prompt": list(shapes_pairs.prompt[:6]) * 2,
                               "image": list(shapes_pairs.pos_path[:6]) + list(shapes_pairs.neg_path[:6])})
    candidates.to_parquet(tmp_path / "candidates.parquet")
    flags = [tmp_path / "candidates.parquet", "--scorer", f"clip:{tiny_init},model={TINY_CLIP}", "--device", "cpu"]
    assert "mean score" in one_and_two("best_of_n.py", flags, tmp_path)
    metadata = [[json.loads(line) for line in open(tmp_path / out / "metadata.jsonl")] for out in ("one", "two")]
    assert [m["file_name"] for m in metadata[0]] == [m["file_name"] for m in metadata[1]]
    np.testing.assert_allclose([m["score"] for m in metadata[1]], [m["score"] for m in metadata[0]], rtol=0, atol=1e-6)


GATHER_SCRIPT = """
import json, sys
import torch
import torch.distributed
sys.path.insert(0, {root!r})
from encoding import is_main_process, prompt_image_scores
from scorers import load_scorer

gathered = []
all_gather_object = torch.distributed.all_gather_object
def counted(parts, mine):
    all_gather_object(parts, mine)
    gathered.extend(part.numel() for part in parts)  # what came from every process, in elements
torch.distributed.all_gather_object = counted

scorer = load_scorer(sys.argv[1])
images, prompts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
scores = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, images, "cpu", batch_size=4)
if is_main_process():
    print(json.dumps({{"scores": scores.tolist(), "gathered": sum(gathered)}}))
"""


def test_two_processes_gather_only_the_scores_and_equal_one(shapes_pairs, tiny_init, tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT.format(root=ROOT))
    images = list(shapes_pairs.pos_path[:7]) + list(shapes_pairs.neg_path[:6])
    requests = [(image, shapes_pairs.prompt[i % 5]) for i, image in enumerate(images + images[:5])]  # 18, repeats
    args = [f"clip:{tiny_init},model={TINY_CLIP}", json.dumps([r[0] for r in requests]),
            json.dumps([r[1] for r in requests])]
    # a process of its own for one too: the script wraps torch.distributed.all_gather_object for good
    one, two = (json.loads(run(launcher, str(script), *args, own_process=True)) for launcher in ([], TWO_PROCESSES))
    np.testing.assert_allclose(two["scores"], one["scores"], rtol=0, atol=1e-6)
    # one float a request crossed between the processes: no embedding (64 floats an image or prompt) did
    assert one["gathered"] == 0 and two["gathered"] == len(requests)
