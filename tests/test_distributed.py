import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_CLIP, assert_same_steps, run_script, save_tiny_init

from social_reward.synthetic.shapes import make_pairs

LEARNING_RATE = 1e-3


def train(launcher, tmp_path, name, pairs_file, init, batch_size, env=None, extra=()):
    """train_pair_pos_neg.py's final weights, launched by `launcher` (python -m LAUNCHER ...) or, with None, run in
    this process as one process of its own would run it (accelerate reads its settings from `env` either way)."""
    save_folder = tmp_path / name
    args = ["--training_file", pairs_file, "--training_mode", "all", "--batch_size", str(batch_size), "--n_epochs", "1",
            "--save_folder", str(save_folder), "--model", TINY_CLIP, "--checkout_path", init, "--learning_rate",
            str(LEARNING_RATE), "--num_workers", "0", *extra]
    if launcher is None:
        result = run_script("train_pair_pos_neg.py", *args, env=env)
    else:
        result = subprocess.run([sys.executable, "-m", *launcher, "train_pair_pos_neg.py", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(save_folder / "clip_epoch_0_global_step_final.pth", weights_only=True)


@pytest.fixture(scope="module")
def one_process_batch_4(tmp_path_factory):
    """The reference run, made once for the module: 8 of shapes_pairs' pairs (two optimizer steps of 4) from
    tiny_init's weights (seed 0, so every test's tiny_init is this one's start)."""
    folder = tmp_path_factory.mktemp("one_process_batch_4")
    pairs_file = str(folder / "pairs.parquet")
    make_pairs(str(folder / "images"), 24, seed=0).iloc[:8].to_parquet(pairs_file)
    init = save_tiny_init(str(folder / "init.pth"))
    return pairs_file, train(None, folder, "one", pairs_file, init, 4)


def test_two_processes_with_batch_2_end_on_the_weights_of_one_with_batch_4(one_process_batch_4, tiny_init, tmp_path):
    pairs_file, one = one_process_batch_4
    two = train(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path, "two", pairs_file,
                tiny_init, 2, env={"ACCELERATE_USE_CPU": "1"})
    assert_same_steps(two, one, torch.load(tiny_init, weights_only=True), LEARNING_RATE)


@pytest.mark.parametrize("how", ["flag", "accelerate_env"])
def test_gradient_accumulation_of_2_batches_of_2_ends_on_the_weights_of_batch_4(how, one_process_batch_4, tiny_init,
                                                                                tmp_path):
    pairs_file, one = one_process_batch_4
    if how == "flag":
        accumulated = train(None, tmp_path, "accumulated", pairs_file, tiny_init, 2,
                            extra=["--gradient_accumulation_steps", "2"])
    else:  # what accelerate's DeepSpeed launcher and configs set
        accumulated = train(None, tmp_path, "accumulated", pairs_file, tiny_init, 2,
                            env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    assert_same_steps(accumulated, one, torch.load(tiny_init, weights_only=True), LEARNING_RATE)


def test_mixed_precision_from_accelerate_launch_is_applied_and_checkpoints_stay_fp32(one_process_batch_4, tiny_init,
                                                                                      tmp_path):
    pairs_file, fp32 = one_process_batch_4
    launcher = ["accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    bf16 = train(launcher, tmp_path, "bf16", pairs_file, tiny_init, 4)
    assert all(v.dtype == torch.float32 for v in bf16.values() if v.is_floating_point())
    # autocast ran the matrix products in bf16: the run ends on other weights than the fp32 one
    assert any(not torch.allclose(bf16[k], fp32[k], atol=1e-6) for k in fp32)


# accelerate's launcher with an FSDP config on CPUs: it starts 2 processes (WORLD_SIZE=2), but accelerate sets FSDP
# (and any process group) up on GPUs only, so each process's Accelerator runs it alone
FSDP_ON_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def test_a_launch_whose_processes_each_run_alone_is_refused_in_one_line_writing_nothing(one_process_batch_4,
                                                                                          tiny_init, tmp_path):
    pairs_file, _ = one_process_batch_4
    (tmp_path / "fsdp.yaml").write_text(FSDP_ON_CPU)
    save_folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(tmp_path / "fsdp.yaml"), "train_pair_pos_neg.py", "--training_file", pairs_file,
                             "--batch_size", "4", "--n_epochs", "1", "--save_folder", str(save_folder), "--model",
                             TINY_CLIP, "--checkout_path", tiny_init, "--num_workers", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert refusals and all("this process is one of 2 that the launcher started, but accelerate runs it as one of 1"
                            in line and "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2" in line for line in refusals)
    assert not save_folder.exists() or not os.listdir(save_folder)


def test_generate_refuses_a_launch_of_several_processes_before_reading_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "scripts/generate.py", "--pretrained_model_name_or_path", str(tmp_path / "no-pipeline"),
                             "--prompts", str(tmp_path / "no-prompts.txt"), "--generator", "base", "--output_dir",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "error: scripts/generate.py runs on one process; a launch of 2 would write every output 2 times" in \
        result.stderr
    assert not (tmp_path / "out").exists()


RANK_1_DISK_FULL = """
import os, runpy, shutil, sys
from collections import namedtuple
if os.environ["RANK"] == "1":  # only this process's disk is full, as a node-local disk can be
    shutil.disk_usage = lambda path: namedtuple("Usage", "total used free")(10**9, 10**9, 1000)
sys.argv = ["train_pair_pos_neg.py", *sys.argv[1:]]
runpy.run_path("train_pair_pos_neg.py", run_name="__main__")
"""


def test_a_check_failing_on_one_process_stops_every_process_in_one_line_writing_nothing(one_process_batch_4,
                                                                                         tiny_init, tmp_path):
    pairs_file, _ = one_process_batch_4
    (tmp_path / "driver.py").write_text(RANK_1_DISK_FULL)
    save_folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "driver.py"), "--training_file", pairs_file, "--batch_size", "2",
                             "--n_epochs", "1", "--save_folder", str(save_folder), "--model", TINY_CLIP,
                             "--checkout_path", tiny_init, "--num_workers", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # every process stops with the same line naming the one whose disk is full (torchrun may stop one before it
    # prints): none waits at a barrier, and the main process, whose disk has room, writes nothing either
    assert refusals and len(set(refusals)) == 1
    assert refusals[0].startswith("error: process 1: ") and "not enough free space" in refusals[0]
    assert not [f for f in os.listdir(save_folder) if f.startswith(("clip_", "training_state"))]


def test_a_scoring_script_under_that_launch_runs_as_one_run_of_two_processes(one_process_batch_4, tiny_init, tmp_path):
    """validate.py makes its process group from WORLD_SIZE itself (gloo on CPUs): under the same FSDP-on-CPU launch it
    is one run of two processes, printing what one process prints, once."""
    pairs_file, _ = one_process_batch_4
    (tmp_path / "fsdp.yaml").write_text(FSDP_ON_CPU)
    args = ["validate.py", pairs_file, "--model", TINY_CLIP, "--checkout_path", tiny_init, "--device", "cpu",
            "--num_workers", "0"]
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(tmp_path / "fsdp.yaml"), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = run_script(*args)
    assert launched.stdout.count("Accuracy: ") == 1 and launched.stdout == one.stdout
