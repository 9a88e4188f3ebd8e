"""Every scoring script under torchrun on two CPU processes prints and writes what one process does: each process
encodes a share of the images and prompts (encoding.across_processes), the main process alone writes and prints.
The five scripts' two-process runs share one torchrun launch (a launch costs three interpreters importing torch),
each script run there as its command line runs (conftest.run_script: its own __main__)."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, TINY_CLIP, run_script, save_tiny_init
from social_reward.synthetic.shapes import make_pairs
from test_shard_order import write_shard

TWO_PROCESSES = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port: tests run side by side
SCRIPTS = ("validate.py", "scripts/score.py", "scripts/compare.py", "scripts/evaluate_generators.py", "scripts/best_of_n.py")

# run by each of torchrun's two processes: every (script, args) in turn, each process's stdout into its own file
SCRIPTS_ON_TWO_PROCESSES = """
import json, os, sys
sys.path.insert(0, {tests!r})
from conftest import run_script
for script, args, stdout in json.load(open(sys.argv[1])):
    result = run_script(script, *args)
    with open(f"{{stdout}}.rank{{os.environ['RANK']}}", "w") as f:
        f.write(result.stdout)
    if result.returncode:
        sys.exit(f"{{script}} on rank {{os.environ['RANK']}}: {{result.stderr[-3000:]}}")
"""


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


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files every script reads: tiny_init's weights, shapes_pairs' 24 pairs, two Pick-a-Pic shards."""
    folder = tmp_path_factory.mktemp("inputs")
    pairs = make_pairs(str(folder / "images"), 24, seed=0)
    return {"folder": folder, "init": save_tiny_init(str(folder / "init.pth")), "pairs": pairs,
            "shards": [write_shard(folder / "a.parquet", 0, 10, 4), write_shard(folder / "b.parquet", 10, 7, 3)]}


def command_lines(inputs, side):
    """{script: its flags} for one side ("one" or "two"): the same inputs, each script's outputs in SIDE/SCRIPT/."""
    init, pairs, folder = inputs["init"], inputs["pairs"], inputs["folder"]
    out = {script: folder / side / os.path.basename(script) for script in SCRIPTS}
    clip = ["--model", TINY_CLIP, "--pretrained", "none", "--checkout_path", init, "--device", "cpu"]
    pairs.to_parquet(folder / "pairs.parquet")
    pd.DataFrame({"generator": ["a"] * 12 + ["b"] * 12, "prompt": list(pairs.prompt[:12]) * 2,
                  "image": list(pairs.pos_path[:12]) + list(pairs.neg_path[:12])}).to_parquet(folder / "generations.parquet")
    pd.DataFrame({"prompt": list(pairs.prompt[:6]) * 2,
                  "image": list(pairs.pos_path[:6]) + list(pairs.neg_path[:6])}).to_parquet(folder / "candidates.parquet")
    images = list(pairs.pos_path[:7]) + list(pairs.neg_path[:6])  # 13 images: shares of 6 and 7
    scorer = f"clip:{init},model={TINY_CLIP}"
    return {
        "validate.py": [*inputs["shards"], *clip, "--scores_out", out["validate.py"] / "scores.csv"],  # 34 images
        "scripts/score.py": ["--prompt", "three blue squares", *images, *clip, "--output", out["scripts/score.py"] / "scores.csv"],
        "scripts/compare.py": [folder / "pairs.parquet", "--scorer", f"a={scorer}", "--device", "cpu", "--out",
                       out["scripts/compare.py"]],
        "scripts/evaluate_generators.py": [folder / "generations.parquet", "--scorer", f"ours={scorer}", "--device", "cpu",
                                   "--out", out["scripts/evaluate_generators.py"]],
        "scripts/best_of_n.py": [folder / "candidates.parquet", "--scorer", scorer, "--device", "cpu", "--out",
                         out["scripts/best_of_n.py"]]}


@pytest.fixture(scope="module")
def two_processes(inputs):
    """Every script's command line on two processes, in one torchrun launch: {script: (rank 0's stdout, rank 1's)}."""
    folder = inputs["folder"]
    scripts = [(script, [str(a) for a in flags], str(folder / f"{os.path.basename(script)}.stdout"))
               for script, flags in command_lines(inputs, "two").items()]
    for script in ("validate.py", "score.py"):  # the two that write a file, not a folder
        (folder / "two" / script).mkdir(parents=True)
    (folder / "scripts.json").write_text(json.dumps(scripts))
    (folder / "driver.py").write_text(SCRIPTS_ON_TWO_PROCESSES.format(tests=os.path.join(ROOT, "tests")))
    run(TWO_PROCESSES, str(folder / "driver.py"), folder / "scripts.json")
    return {script: tuple(open(f"{stdout}.rank{rank}").read() for rank in (0, 1)) for script, _, stdout in scripts}


def one_and_two(script, inputs, two_processes):
    """The script's printed lines on one process (this one) and on two (the main process prints, the other nothing):
    the same, their output folders (one/, two/) aside."""
    one_out, two_out = (inputs["folder"] / side / os.path.basename(script) for side in ("one", "two"))
    if script in ("validate.py", "scripts/score.py"):
        one_out.mkdir(parents=True)
    one = run([], script, *command_lines(inputs, "one")[script])
    two, other = two_processes[script]
    assert two.replace(str(two_out), "OUT") == one.replace(str(one_out), "OUT")
    assert other == ""
    return one, one_out, two_out


def assert_same_table(path_one, path_two):
    one, two = pd.read_csv(path_one), pd.read_csv(path_two)
    assert list(one.columns) == list(two.columns) and len(one) == len(two)
    for column in one.columns:
        if pd.api.types.is_float_dtype(one[column]):
            np.testing.assert_allclose(two[column], one[column], rtol=0, atol=1e-6)
        else:
            assert one[column].equals(two[column]), column


def test_validate_on_two_processes_prints_and_writes_what_one_does(inputs, two_processes):
    printed, one, two = one_and_two("validate.py", inputs, two_processes)
    assert "Pick-a-Pic accuracy" in printed
    assert_same_table(one / "scores.csv", two / "scores.csv")  # every image's score, 34 images in shares of 17


def test_score_on_two_processes_prints_and_writes_the_ranking_one_does(inputs, two_processes):
    printed, one, two = one_and_two("scripts/score.py", inputs, two_processes)
    assert len(printed.splitlines()) == 13
    assert_same_table(one / "scores.csv", two / "scores.csv")


def test_compare_on_two_processes_keeps_and_writes_what_one_does(inputs, two_processes):
    printed, one, two = one_and_two("scripts/compare.py", inputs, two_processes)
    assert "a: scoring" in printed
    for name in ("table.csv", "agreement.csv"):
        assert_same_table(one / name, two / name)
    assert (one / "table.md").read_text() == (two / "table.md").read_text()
    # the kept scores: written by the main process alone, a part a flush
    kept_one, kept_two = (sorted(os.listdir(out / "scores")) for out in (one, two))
    assert kept_one == kept_two and len(kept_two) == 1
    scores_one, scores_two = (pd.read_parquet(out / "scores" / kept_one[0]) for out in (one, two))
    assert scores_one.prompt.equals(scores_two.prompt) and scores_one.image.equals(scores_two.image)
    np.testing.assert_allclose(scores_two.score, scores_one.score, rtol=0, atol=1e-6)
    assert not list((two / "scores").glob("*.tmp"))


def test_evaluate_generators_on_two_processes_writes_what_one_does(inputs, two_processes):
    printed, one, two = one_and_two("scripts/evaluate_generators.py", inputs, two_processes)
    assert "ours: scoring 24" in printed
    for name in ("leaderboard.csv", "winrates.csv"):
        assert_same_table(one / name, two / name)
    one_scores, two_scores = (pd.read_parquet(out / "scores.parquet") for out in (one, two))
    np.testing.assert_allclose(two_scores.score, one_scores.score, rtol=0, atol=1e-6)


def test_best_of_n_on_two_processes_keeps_what_one_does(inputs, two_processes):
    printed, one, two = one_and_two("scripts/best_of_n.py", inputs, two_processes)
    assert "mean score" in printed
    metadata = [[json.loads(line) for line in open(out / "metadata.jsonl")] for out in (one, two)]
    assert [m["file_name"] for m in metadata[0]] == [m["file_name"] for m in metadata[1]]
    np.testing.assert_allclose([m["score"] for m in metadata[1]], [m["score"] for m in metadata[0]], rtol=0, atol=1e-6)


GATHER_SCRIPT = """
import json, sys
import torch
import torch.distributed
from social_reward.dist import is_main_process
from social_reward.scorers.registry import load_scorer
from social_reward.scoring.encoding import prompt_image_scores

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
