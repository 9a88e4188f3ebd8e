"""Seconds per fine-tuning step of scripts/finetune_generator.py and its peak memory, on the tiny pipelines, on this
machine; and on paper, the FLOPs of one DRaFT-1 step of the real models.

    python benchmarks/finetune_generator_speed.py                      # about 6 minutes on a 2-CPU VM
    python benchmarks/finetune_generator_speed.py --steps 6 --json benchmarks/results-generator-cpu.json
    python benchmarks/finetune_generator_speed.py --flops      # the paper estimates' counts (meta tensors, a minute)

Each configuration runs in its own process (so peak memory, the process's VmHWM, is that run's alone) and calls
social_reward.training.generator.finetune_generator() as a user's run does: the tiny pipelines of the tests
(social_reward.synthetic.pipelines.make_tiny_pipeline) at 64 px, 8 sampling steps with guidance, batch 2, the tiny CLIP
as the reward: for SD, DRaFT with --grad_steps 1 and 4, each with and without --gradient_checkpointing; for SDXL, SD3
and FLUX, DRaFT-1. A step's time is between two optimizer steps (median; the first step, a warm-up, left out), in
wall-clock seconds and in the process's CPU seconds.
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
PROMPTS = ["one red circle", "two blue squares", "three green triangles", "one yellow square"]
# (family, --grad_steps, --gradient_checkpointing)
CONFIGS = [("sd", 1, False), ("sd", 1, True), ("sd", 4, False), ("sd", 4, True), ("sdxl", 1, False),
           ("sd3", 1, False), ("flux", 1, False)]
H100_BF16 = 989e12  # dense bf16 FLOP/s of an H100 SXM


def worker(args):
    """One configuration, in this process; prints its result as JSON."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from social_reward.cli import keep_freed_memory
    from social_reward.training.generator import finetune_generator
    keep_freed_memory()  # as the scripts' run_cli does
    stamps, cpu_stamps = [], []  # wall clock, and this process's CPU time (less moved by other processes' load)
    register_optimizer_step_post_hook(lambda *_: (stamps.append(time.perf_counter()),
                                                  cpu_stamps.append(time.process_time())))
    with tempfile.TemporaryDirectory() as save_folder:
        start = time.perf_counter()
        finetune_generator(args.pipeline, args.prompts, f"clip:{args.reward},model={TINY_CLIP}", method="draft",
                           sampling_steps=8, grad_steps=args.grad_steps, resolution=64, train_batch_size=2,
                           max_train_steps=args.steps, checkpointing_steps=args.steps,
                           output_dir=os.path.join(save_folder, "run"),
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


def count_family_flops():
    """FLOPs of one forward, counted as count_flops does, of SDXL's UNet at 128x128 latents, SD3.5-medium's and
    FLUX.1-dev's transformers at 1024 px (their published configs; SD3's 77 + 256 text tokens, FLUX's 512), and of the
    4- and 16-channel VAE decoders at 1024 px."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        sd35m = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        flux = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        vae = {channels: AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                       down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=channels,
                                       up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=channels == 4,
                                       use_post_quant_conv=channels == 4) for channels in (4, 16)}
        parts = {
            "sdxl_unet": lambda: sdxl(torch.randn(1, 4, 128, 128), torch.tensor([500]),
                                      encoder_hidden_states=torch.randn(1, 77, 2048), added_cond_kwargs={
                                          "text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}),
            "sd35_medium_transformer": lambda: sd35m(hidden_states=torch.randn(1, 16, 128, 128),
                                                     timestep=torch.tensor([500.0]),
                                                     encoder_hidden_states=torch.randn(1, 333, 4096),
                                                     pooled_projections=torch.randn(1, 2048)),
            "flux_dev_transformer": lambda: flux(hidden_states=torch.randn(1, 4096, 64), timestep=torch.tensor([0.5]),
                                                 guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 768),
                                                 encoder_hidden_states=torch.randn(1, 512, 4096),
                                                 txt_ids=torch.zeros(512, 3), img_ids=torch.zeros(4096, 3)),
            "vae4_decoder_1024": lambda: vae[4].decode(torch.randn(1, 4, 128, 128)),
            "vae16_decoder_1024": lambda: vae[16].decode(torch.randn(1, 16, 128, 128)),
        }
        counts = {f"{name}_params": sum(p.numel() for p in model.parameters())
                  for name, model in (("sdxl_unet", sdxl), ("sd35_medium_transformer", sd35m),
                                      ("flux_dev_transformer", flux))}
        for name, forward in parts.items():
            with FlopCounterMode(display=False) as counter:
                forward()
            counts[name] = counter.get_total_flops()
    return counts


def text_flops(layers, width, tokens, ff=4, gated=False):
    """A text tower's forward by hand: per token and layer 4 w^2 (attention projections) + (2 or 3) w ff w (MLP)
    multiply-accumulates, 2 FLOPs each (attention scores left out: 77-512 tokens)."""
    return 2 * layers * tokens * (4 * width ** 2 + (3 if gated else 2) * width * ff * width)


def paper_estimates(counts, reward_flops):
    """Per prompt, one DRaFT-1 step at 1024 px: sampling (the pipeline's default steps, x2 under CFG), text towers,
    VAE decode, the reward; backward = 2 x the gradient path's forward (the last step, decode, reward)."""
    clip_l, clip_g = text_flops(12, 768, 77), text_flops(32, 1280, 77)
    t5_256, t5_512 = text_flops(24, 4096, 256, 2.5, True), text_flops(24, 4096, 512, 2.5, True)
    models = [  # name, denoiser forward, steps, CFG passes, text forward (prompt + empty prompt under CFG), VAE
        ("SDXL", counts["sdxl_unet"], 50, 2, 2 * (clip_l + clip_g), counts["vae4_decoder_1024"]),
        ("SD3.5-medium", counts["sd35_medium_transformer"], 28, 2, 2 * (clip_l + clip_g + t5_256),
         counts["vae16_decoder_1024"]),
        ("FLUX.1-dev", counts["flux_dev_transformer"], 28, 1, clip_l + t5_512, counts["vae16_decoder_1024"])]
    rows = []
    for name, denoiser, steps, passes, text, vae in models:
        forward = steps * passes * denoiser + text + vae + reward_flops
        gradient_path = passes * denoiser + vae + reward_flops
        total = forward + 2 * gradient_path
        seconds = total / (0.4 * H100_BF16)
        rows.append({"model": name, "denoiser_tflops": denoiser / 1e12, "steps": steps, "passes": passes,
                     "text_tflops": text / 1e12, "vae_tflops": vae / 1e12, "forward_tflops": forward / 1e12,
                     "backward_tflops": 2 * gradient_path / 1e12, "step_tflops": total / 1e12,
                     "s_per_prompt": seconds})
    return rows


def measure(pipeline, prompts, reward, grad_steps, gradient_checkpointing, steps):
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--pipeline", pipeline, "--prompts", prompts,
               "--reward", reward, "--grad_steps", str(grad_steps), "--steps", str(steps)]
    command += ["--gradient_checkpointing"] if gradient_checkpointing else []
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{pipeline}: grad_steps {grad_steps}, checkpointing {gradient_checkpointing} failed:\n"
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
        counts = {**count_flops(), **count_family_flops()}
        for name, count in counts.items():
            print(f"{name}: {count / 1e6:.1f} M" if name.endswith("params") else f"{name}: {count / 1e12:.4f} TFLOPs")
        reward = counts["vit_l14_image"] + text_flops(12, 768, 77)
        for row in paper_estimates(counts, reward):
            print(f"{row['model']}: {row['steps']} steps x {row['passes']} x {row['denoiser_tflops']:.3f} + text "
                  f"{row['text_tflops']:.2f} + VAE {row['vae_tflops']:.2f} + reward {reward / 1e12:.2f} = forward "
                  f"{row['forward_tflops']:.1f}; backward {row['backward_tflops']:.1f}; step {row['step_tflops']:.1f} "
                  f"TFLOPs: {row['s_per_prompt']:.2f} s per prompt at 40% of an H100's bf16 peak")
        return

    import torch
    from social_reward.synthetic.pipelines import make_tiny_pipeline
    with tempfile.TemporaryDirectory() as folder:
        pipelines = {family: make_tiny_pipeline(os.path.join(folder, f"tiny-{family}"), family)
                     for family in ("sd", "sdxl", "sd3", "flux")}
        prompts, reward = generator_run_files(folder, PROMPTS)
        rows, load_before = [], os.getloadavg()
        for family, grad_steps, checkpointing in CONFIGS:
            row = measure(pipelines[family], prompts, reward, grad_steps, checkpointing, args.steps)
            rows.append({"family": family, "grad_steps": grad_steps, "gradient_checkpointing": checkpointing, **row})
            print(f"{family:5s} --grad_steps {grad_steps}{' --gradient_checkpointing' if checkpointing else '':26s} "
                  f"{row['step_s']:.3f} s/step ({row['step_cpu_s']:.3f} CPU s)  peak RSS {row['peak_rss_gb']:.3f} GiB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows,
              "load_average_1_5_15_min_before": load_before, "load_average_1_5_15_min_after": os.getloadavg(),
              "command": " ".join(["python"] + sys.argv),
              "config": "tiny pipelines, 64 px, 8 sampling steps, each family's default guidance (SD 7.5, SDXL 5, "
                        "SD3 7, FLUX 3.5 embedded), batch 2, DRaFT, tiny CLIP reward"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
