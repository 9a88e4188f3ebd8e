"""Whether GRPO learns: the validation reward before and after 40 steps of scripts/finetune_generator.py --method grpo
with its defaults on each tiny pipeline, and the tuned generator against its base under scripts/evaluate_generators.py.

    python benchmarks/grpo_learning.py                     # sd, sdxl, sd3, flux; about 4 min on a 2-CPU VM
    python benchmarks/grpo_learning.py --families sd sd3 --rewards pickscore_like clip --seeds 0 1 2 \\
        --json benchmarks/results-grpo-learning-cpu.json
    python benchmarks/grpo_learning.py --kl_beta 0.04 --low_noise 0   # the settings before 2026-12-03
    python benchmarks/grpo_learning.py --run num_inner_epochs=2         # two updates a round, the second off-policy

Each run: the family's tiny pipeline (social_reward.synthetic.pipelines.make_tiny_pipeline) at 16 px, 6 sampling steps,
its own guidance, 2 prompts x a group of 8 a step, the GRPO flags at their defaults (--kl_beta 0, --clip_range 1e-4,
every step that injects noise trained) and the tiny scale's learning rate (UNet families 2e-2, transformer families
4e-2: random 16-wide layers; 3e-4, the default, is the references' at scale), one thread. Rewards (both unlike the test
suite's seed-0 tiny CLIP): pickscore_like, a tiny random transformers CLIPModel read by pickscore: whose scores sit near
72 (tests/test_finetune_grpo.py's), and clip, the tiny open_clip CLIP at random init seed 7. After training,
scripts/generate.py makes 8 samples of each prompt with and without the LoRA (the same noise) and
scripts/evaluate_generators.py scores them: the win rate of the tuned generator over its base and both means.
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
PROMPTS = ["a red circle", "two blue squares"]
RUN = dict(method="grpo", sampling_steps=6, resolution=16, train_batch_size=2, group_size=8)
LEARNING_RATES = {"sd": 2e-2, "sdxl": 2e-2, "sd3": 4e-2, "flux": 4e-2}  # the tiny pipelines' (measured, seed 0)


def save_tiny_pickscore_like(folder, seed=3):
    """A tiny random transformers CLIPModel (PickScore_v1's layout, 32 px) whose scores sit near 72: logit_scale
    e^4.6 = 100, the image and text embeddings sharing one direction (cosines near 0.72). PickScore's own scores sit
    near 20 and ImageReward's near 0: an offset far from both. Returns the folder.

        spec = f"pickscore:{save_tiny_pickscore_like('pickscore-like')}"
    """
    import torch
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, max_position_embeddings=77, vocab_size=49408),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=32)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
        shared = torch.randn(32)
        for norm, projection in ((model.vision_model.post_layernorm, model.visual_projection),
                                 (model.text_model.final_layer_norm, model.text_projection)):
            norm.bias[0] = 1.4  # one hidden unit always on, projected on the same direction by both towers
            projection.weight[:, 0] = shared
    model.save_pretrained(folder)
    return str(folder)


def save_clip(path, seed=7):
    """The tiny open_clip CLIP at random init `seed`, as an OpenAI-format state dict; returns the clip: spec."""
    import torch
    from social_reward.models.clip import load_model
    torch.manual_seed(seed)
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), path)
    return f"clip:{path},model={TINY_CLIP}"


def learn(pipeline, prompts, spec, folder, steps, learning_rate, seed, kl_beta, samples):
    """One GRPO run and its evaluation: a dict of the numbers."""
    import pandas as pd

    from social_reward.generators.generate import generate
    from social_reward.scoring.leaderboard import evaluate_generators
    from social_reward.training.generator import finetune_generator
    start, cpu = time.perf_counter(), time.process_time()
    final = finetune_generator(pipeline, prompts, f"r={spec}", learning_rate=learning_rate, max_train_steps=steps,
                               checkpointing_steps=steps, validation_prompts=prompts, seed=seed, kl_beta=kl_beta,
                               output_dir=os.path.join(folder, "run"), **RUN)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    metrics = pd.read_csv(os.path.join(folder, "run", "metrics.csv"))
    out = os.path.join(folder, "generations")
    for name, lora in (("base", None), ("grpo", os.path.dirname(final))):
        generate(pipeline, prompts, name, out, samples=samples, lora=lora, resolution=RUN["resolution"],
                 num_inference_steps=RUN["sampling_steps"])
    board, rates = evaluate_generators(os.path.join(out, "generations.parquet"), {"r": spec},
                                       os.path.join(folder, "table"), device="cpu", num_workers=0)
    means = board[board["style"] == "all"].set_index("generator")["mean"]
    rate = rates[(rates.generator == "grpo") & (rates.other == "base") & (rates["style"] == "all")].win_rate.item()
    logged = metrics[1:]
    return {"val_before": metrics.val_reward.iloc[0], "val_after": metrics.val_reward.iloc[-1],
            "base_mean": means["base"], "grpo_mean": means["grpo"], "win_rate": rate,
            "train_reward_first10": logged.reward[:10].mean(), "train_reward_last10": logged.reward[-10:].mean(),
            "reward_std": logged.reward_std.mean(), "grad_norm": logged.grad_norm.mean(),
            "clipped": logged.clipped.mean(), "kl_last": logged.kl.iloc[-1],
            "train_s": seconds, "train_cpu_s": cpu_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl", "sd3", "flux"])
    parser.add_argument("--rewards", nargs="+", default=["pickscore_like"], choices=["pickscore_like", "clip"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--learning_rate", type=float, default=None, help="default: the family's in LEARNING_RATES")
    parser.add_argument("--kl_beta", type=float, default=0.0)
    parser.add_argument("--low_noise", type=float, default=None,
                        help="social_reward.generators.grpo.LOW_NOISE for this run (0: train every step, as before "
                             "2026-12-03)")
    parser.add_argument("--samples", type=int, default=8, help="evaluation samples a prompt")
    parser.add_argument("--run", nargs="+", default=[], metavar="FLAG=VALUE",
                        help="finetune_generator flags over RUN's (values as JSON), e.g. train_batch_size=1 "
                             "sample_batch_size=2: GRPO's rounds of several minibatches")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    from social_reward.generators import grpo
    from social_reward.synthetic.pipelines import make_tiny_pipeline
    torch.set_num_threads(1)
    if args.low_noise is not None:
        grpo.LOW_NOISE = args.low_noise
    RUN.update({flag: json.loads(value) for flag, value in (item.split("=", 1) for item in args.run)})
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        prompts = os.path.join(folder, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("\n".join(PROMPTS) + "\n")
        specs = {"pickscore_like": f"pickscore:{save_tiny_pickscore_like(os.path.join(folder, 'pickscore-like'))}",
                 "clip": save_clip(os.path.join(folder, "clip7.pth"))}
        for family in args.families:
            pipeline = make_tiny_pipeline(os.path.join(folder, f"tiny-{family}"), family)
            for reward in args.rewards:
                for seed in args.seeds:
                    lr = args.learning_rate or LEARNING_RATES[family]
                    row = {"family": family, "reward": reward, "seed": seed, "learning_rate": lr,
                           **learn(pipeline, prompts, specs[reward], os.path.join(folder, f"{family}-{reward}-{seed}"),
                                   args.steps, lr, seed, args.kl_beta, args.samples)}
                    rows.append(row)
                    print(f"{family:5s} {reward:14s} seed {seed}: validation reward {row['val_before']:.4f} -> "
                          f"{row['val_after']:.4f} in {args.steps} steps; evaluate_generators: grpo "
                          f"{row['grpo_mean']:.4f} vs base {row['base_mean']:.4f}, win rate {row['win_rate']:.2f} "
                          f"({row['train_s']:.0f} s, {row['train_cpu_s']:.0f} CPU s)", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "load_average": [load, os.getloadavg()], "command": " ".join(sys.argv), "rows": rows,
              "config": f"tiny pipelines, {RUN}, {args.steps} steps, kl_beta {args.kl_beta}, "
                        f"LOW_NOISE {grpo.LOW_NOISE}, {args.samples} evaluation samples a prompt"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
