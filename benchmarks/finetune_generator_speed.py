"""Seconds per fine-tuning step of finetune_generator.py and its peak memory, on the tiny pipeline, on this machine.

    python benchmarks/finetune_generator_speed.py                      # about 5 minutes on a 2-CPU VM
    python benchmarks/finetune_generator_speed.py --steps 6 --json benchmarks/results-generator-cpu.json
    python benchmarks/finetune_generator_speed.py --flops      # the paper estimate's counts (meta tensors, seconds)

Each configuration runs in its own process (so peak memory, the process's VmHWM, is that run's alone) and calls
finetune_generator() as a user's run does: the tiny pipeline of the tests (generators.make_tiny_pipeline) at 64 px,
8 DDIM steps with classifier-free guidance, batch 2, the tiny CLIP as the reward, DRaFT with --grad_steps 1 and 4,
each with and without --gradient_checkpointing. A step's time is between two optimizer steps (median; the first
step, a warm-up, left out), in wall-clock seconds and in the process's CPU seconds.
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
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import generator_run_files, peak_rss_gb  # noqa: E402

TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
PROMPTS = ["one red circle", "two blue squares", "three green triangles", "one yellow square"]
CONFIGS = [(1, False), (1, True), (4, False), (4, True)]  # (--grad_steps, --gradient_checkpointing)


def worker(args):
    """One configuration, in this process; prints its result as JSON."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from clip_model import keep_freed_memory
    from finetune_generator import finetune_generator
    keep_freed_memory()  # as the scripts' run_cli does
    stamps, cpu_stamps = [], []  # wall clock, and this process's CPU time (less moved by other processes' load)
    register_optimizer_step_post_hook(lambda *_: (stamps.append(time.perf_counter()),
                                                  cpu_stamps.append(time.process_time())))
    with tempfile.TemporaryDirectory() as save_folder:
        start = time.perf_counter()
        finetune_generator(args.pipeline, args.prompts, f"clip:{args.reward},model={TINY_CLIP}", method="draft",
                           sampling_steps=8, grad_steps=args.grad_steps, guidance_scale=7.5, resolution=64,
                           batch_size=2, max_train_steps=args.steps, save_every=args.steps,
                           save_folder=os.path.join(save_folder, "run"),
                           gradient_checkpointing=args.gradient_checkpointing)
        end = time.perf_counter()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    cpu_steps = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]
    print(json.dumps({"step_s": statistics.median(steps), "step_cpu_s": statistics.median(cpu_steps),
                      "steps": len(stamps), "run_s": end - start,
                      "threads": torch.get_num_threads(), "peak_rss_gb": peak_rss_gb()}))


def count_flops():
    """FLOPs of one forward of SD 2.1-base's UNet at 64 x 64 latents, its VAE decoder at 512 px and OpenAI's ViT-L/14
    image tower at 224 px, counted by torch's FlopCounterMode on meta tensors (no weights needed): the parts of the
    estimate in docs/generators.md. The configs are SD 2.1-base's (stabilityai/stable-diffusion-2-1-base)."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                    attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                    use_linear_projection=True)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2)
        clip = open_clip.create_model("ViT-L-14-quickgelu", device="meta")
        parts = {"unet": lambda: unet(torch.randn(1, 4, 64, 64), torch.tensor([500]),
                                      encoder_hidden_states=torch.randn(1, 77, 1024)),
                 "vae_decoder": lambda: vae.decode(torch.randn(1, 4, 64, 64)),
                 "vit_l14_image": lambda: clip.encode_image(torch.randn(1, 3, 224, 224))}
        counts = {"unet_params": sum(p.numel() for p in unet.parameters())}
        for name, forward in parts.items():
            with FlopCounterMode(display=False) as counter:
                forward()
            counts[name] = counter.get_total_flops()
    return counts


def measure(pipeline, prompts, reward, grad_steps, gradient_checkpointing, steps):
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--pipeline", pipeline, "--prompts", prompts,
               "--reward", reward, "--grad_steps", str(grad_steps), "--steps", str(steps)]
    command += ["--gradient_checkpointing"] if gradient_checkpointing else []
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"grad_steps {grad_steps}, checkpointing {gradient_checkpointing} failed:\n"
                         f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--flops", action="store_true", help="only count the FLOPs of the paper estimate's parts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--grad_steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gradient_checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.flops:
        for name, count in count_flops().items():
            print(f"{name}: {count / 1e6:.1f} M" if name.endswith("params") else f"{name}: {count / 1e12:.4f} TFLOPs")
        return

    import torch
    from generators import make_tiny_pipeline
    with tempfile.TemporaryDirectory() as folder:
        pipeline = make_tiny_pipeline(os.path.join(folder, "tiny-sd"))
        prompts, reward = generator_run_files(folder, PROMPTS)
        rows = []
        for grad_steps, checkpointing in CONFIGS:
            row = measure(pipeline, prompts, reward, grad_steps, checkpointing, args.steps)
            rows.append({"grad_steps": grad_steps, "gradient_checkpointing": checkpointing, **row})
            print(f"--grad_steps {grad_steps}{' --gradient_checkpointing' if checkpointing else '':26s} "
                  f"{row['step_s']:.3f} s/step ({row['step_cpu_s']:.3f} CPU s)  peak RSS {row['peak_rss_gb']:.3f} GiB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows,
              "config": "tiny pipeline, 64 px, 8 DDIM steps, CFG 7.5, batch 2, DRaFT, tiny CLIP reward"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
