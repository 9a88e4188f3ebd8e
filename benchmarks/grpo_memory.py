"""Peak memory of a GRPO training step against its minibatch, its micro-batch and its sampling batch: each
configuration of scripts/finetune_generator.py --method grpo runs in its own process on a tiny pipeline, and the memory
each phase adds is measured, a round's sampling (grpo.sample_round) and each optimizer step's forward and backward
(grpo.grpo_train) apart.

    python benchmarks/grpo_memory.py                        # about 6 min on a 2-CPU VM
    python benchmarks/grpo_memory.py --family sd --resolution 64 --json benchmarks/results-grpo-memory-cpu.json

Three series, --group_size 8 images a prompt, the family's default guidance (classifier-free: each image's latents
twice through the denoiser), --sampling_steps 6: the minibatch (--train_batch_size = --sample_batch_size 1, 2, 4
prompts), the micro-batch (--train_batch_size 4 split by --gradient_accumulation_steps 1, 2, 4, 8) and the sampling
batch (--train_batch_size 1, --sample_batch_size 1, 2, 4, 8). A run takes the round's optimizer steps (up to 4; the
later ones off-policy).

What a phase adds: on a CUDA device, torch.cuda.max_memory_allocated over the phase (reset before it) less what was
allocated when it began; on a CPU, the process's peak resident memory over the phase (VmHWM, reset through
/proc/self/clear_refs) less its resident memory when it began, glibc told to hand every freed block of 64 kB or more
back at once (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) so that resident memory follows the live tensors. A
training step's figure is the largest over the run's steps.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import generator_run_files  # noqa: E402

PROMPTS = [f"{n} {colour} {shape}" for n in ("one", "two", "three") for colour in ("red", "blue", "green")
           for shape in ("circles", "squares")][:8]
SERIES = {  # name -> [(train_batch_size, sample_batch_size, gradient_accumulation_steps)]
    "minibatch": [(1, 1, 1), (2, 2, 1), (4, 4, 1)],
    "micro-batch": [(4, 4, 1), (4, 4, 2), (4, 4, 4), (4, 4, 8)],
    "sampling batch": [(1, 1, 1), (1, 2, 1), (1, 4, 1), (1, 8, 1)],
}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}


def resident_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measured(fn, phases, name):
    """fn, recording into phases[name] the bytes each call adds at its peak (CUDA: allocated; CPU: resident)."""
    import torch

    def call(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            phases[name].append(torch.cuda.max_memory_allocated() - before)
            return result
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from the current one
        before = resident_kb("VmRSS")
        result = fn(*args, **kwargs)
        phases[name].append((resident_kb("VmHWM") - before) * 1024)
        return result
    return call


def worker(args):
    """One configuration, in this process; prints its result as JSON."""
    import torch
    from social_reward.generators import grpo
    from social_reward.training.generator import finetune_generator
    torch.set_num_threads(1)
    phases = {"sampling": [], "training": []}
    grpo.sample_round = measured(grpo.sample_round, phases, "sampling")
    grpo.grpo_train = measured(grpo.grpo_train, phases, "training")
    steps = min(4, args.sample_batch_size // args.train_batch_size)
    with tempfile.TemporaryDirectory() as output_dir:
        finetune_generator(args.pipeline, args.prompts, f"clip:{args.reward},model={args.tiny_clip}", method="grpo",
                           group_size=8, sampling_steps=6, resolution=args.resolution, learning_rate=1e-2,
                           train_batch_size=args.train_batch_size, sample_batch_size=args.sample_batch_size,
                           gradient_accumulation_steps=args.gradient_accumulation_steps, max_train_steps=steps,
                           checkpointing_steps=steps, seed=0, output_dir=os.path.join(output_dir, "run"))
    print(json.dumps({"sampling_mb": max(phases["sampling"]) / 2**20,
                      "training_step_mb": max(phases["training"]) / 2**20,
                      "steps": len(phases["training"]), "peak_rss_mb": resident_kb("VmHWM") / 1024,
                      "device": "cuda" if torch.cuda.is_available() else "cpu"}))


def measure(args, pipeline, prompts, reward, train_batch_size, sample_batch_size, accumulation):
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--pipeline", pipeline, "--prompts", prompts,
               "--reward", reward, "--resolution", str(args.resolution), "--train_batch_size", str(train_batch_size),
               "--sample_batch_size", str(sample_batch_size), "--gradient_accumulation_steps", str(accumulation)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **MALLOC})
    if result.returncode:
        raise SystemExit(f"{command} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "sd3", "flux"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--pipeline", "--prompts", "--reward"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--tiny_clip", default=os.path.join(ROOT, "assets", "tiny-clip.json"), help=argparse.SUPPRESS)
    for hidden in ("--train_batch_size", "--sample_batch_size", "--gradient_accumulation_steps"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from social_reward.synthetic.pipelines import make_tiny_pipeline
    rows, load, measured_runs = [], os.getloadavg(), {}
    with tempfile.TemporaryDirectory() as folder:
        prompts, reward = generator_run_files(folder, PROMPTS)
        pipeline = make_tiny_pipeline(os.path.join(folder, f"tiny-{args.family}"), args.family)
        for series, configurations in SERIES.items():
            for train_batch_size, sample_batch_size, accumulation in configurations:
                key = (train_batch_size, sample_batch_size, accumulation)
                if key not in measured_runs:  # a configuration two series share runs once
                    measured_runs[key] = measure(args, pipeline, prompts, reward, *key)
                row = {"series": series, "train_batch_size": train_batch_size, "sample_batch_size": sample_batch_size,
                       "gradient_accumulation_steps": accumulation, "minibatch_images": train_batch_size * 8,
                       "micro_batch_images": train_batch_size * 8 // accumulation,
                       "round_images": sample_batch_size * 8, **measured_runs[key]}
                rows.append(row)
                print(f"{series:14s} train {train_batch_size} sample {sample_batch_size} accumulation {accumulation}: "
                      f"round {row['round_images']:3d} images, micro-batch {row['micro_batch_images']:2d}: "
                      f"training step +{row['training_step_mb']:7.1f} MB, sampling +{row['sampling_mb']:7.1f} MB, "
                      f"process peak {row['peak_rss_mb']:.0f} MB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "load_average": [load, os.getloadavg()], "rows": rows, "command": " ".join(sys.argv),
              "config": f"tiny {args.family} at {args.resolution} px, group 8, 6 sampling steps, the family's "
                        f"guidance, tiny CLIP reward, one thread"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
