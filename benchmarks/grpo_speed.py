"""Seconds per GRPO step against a DRaFT-1 step of scripts/finetune_generator.py, on the tiny pipelines, on this
machine.

    python benchmarks/grpo_speed.py                                    # a few minutes on a 2-CPU VM
    python benchmarks/grpo_speed.py --steps 4 --families sd flux --json benchmarks/results-grpo-cpu.json

Each configuration runs in its own process and calls finetune_generator() as a user's run does: the tests' tiny pipeline
of the family (social_reward.synthetic.pipelines.make_tiny_pipeline) at 32 px, 8 sampling steps, no guidance, 2 prompts
a step, the tiny CLIP as the reward, one thread. DRaFT-1 makes 2 images a step; GRPO makes 2 groups of --group_size
(default 8), trains every step that injects noise (--timestep_fraction 1: 6 of DDIM's 8 steps, 7 of the flow's) and the
KL to the base (--kl_beta 0.04, one more forward a trained step). A step's time is between two optimizer steps (median;
the first, a warm-up, left out), wall clock and the process's CPU seconds.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench.py beside this file (social_reward itself is pip-installed)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import generator_run_files, peak_rss_gb  # noqa: E402

TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
PROMPTS = ["one red circle", "two blue squares"]
RUN = dict(sampling_steps=8, resolution=32, guidance_scale=1.0, train_batch_size=2, learning_rate=1e-2, seed=0)


def worker(args):
    """One configuration, in this process; prints its result as JSON."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from social_reward.cli import keep_freed_memory
    from social_reward.training.generator import finetune_generator
    keep_freed_memory()
    torch.set_num_threads(1)
    stamps, cpu_stamps = [], []
    register_optimizer_step_post_hook(lambda *_: (stamps.append(time.perf_counter()),
                                                  cpu_stamps.append(time.process_time())))
    method = dict(method="draft", grad_steps=1) if args.method == "draft" else dict(
        method="grpo", group_size=args.group_size, kl_beta=0.04, timestep_fraction=1.0)
    with tempfile.TemporaryDirectory() as output_dir:
        finetune_generator(args.pipeline, args.prompts, f"clip:{args.reward},model={TINY_CLIP}", **method, **RUN,
                           max_train_steps=args.steps, checkpointing_steps=args.steps,
                           output_dir=os.path.join(output_dir, "run"))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    cpu_steps = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]
    print(json.dumps({"step_s": statistics.median(steps), "step_cpu_s": statistics.median(cpu_steps),
                      "steps": len(stamps), "peak_rss_gb": peak_rss_gb()}))


def measure(pipeline, prompts, reward, method, group_size, steps):
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--pipeline", pipeline, "--prompts", prompts,
               "--reward", reward, "--method", method, "--group_size", str(group_size), "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--families", nargs="+", default=["sd", "flux"])
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from social_reward.synthetic.pipelines import make_tiny_pipeline
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        prompts, reward = generator_run_files(folder, PROMPTS)
        for family in args.families:
            pipeline = make_tiny_pipeline(os.path.join(folder, f"tiny-{family}"), family)
            for method in ("draft", "grpo"):
                row = {"family": family, "method": method, "images_per_step": 2 * (args.group_size if method == "grpo" else 1),
                       **measure(pipeline, prompts, reward, method, args.group_size, args.steps)}
                rows.append(row)
                print(f"{family:5s} {method:5s} {row['images_per_step']:3d} images/step  {row['step_s']:.3f} s/step "
                      f"({row['step_cpu_s']:.3f} CPU s)  peak RSS {row['peak_rss_gb']:.3f} GiB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "load_average": [load, os.getloadavg()], "rows": rows, "command": " ".join(sys.argv),
              "config": f"tiny pipelines, {RUN}, GRPO group {args.group_size}, kl_beta 0.04, tiny CLIP reward"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
