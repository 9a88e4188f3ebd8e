"""A generator fine-tuned through a reward, offline on a CPU in a few minutes: a tiny Stable Diffusion pipeline with
random weights, LoRA-tuned by scripts/finetune_generator.py (DRaFT) through `accelerate launch`, its validation reward
before and after, a picture of the same seeds before and after, and the tuned generator's win rate over its base
under the reward (scripts/generate.py, then scripts/evaluate_generators.py, as the paper's table is made).

    python scripts/demo_generator.py             # writes ./demo_generator_out: the pipeline, the LoRA, the picture
    python scripts/demo_generator.py --scorer clip:demo_out/clip_finetune/clip_epoch_4_global_step_final.pth,model=assets/tiny-clip.json

The default reward is a tiny CLIP with random weights: an arbitrary but fixed smooth function of the image and the
prompt, which a tiny generator can learn to raise in a few hundred steps (`python demo.py` trains a tiny CLIP that
knows colours and shapes: pass it with --scorer to tune the generator towards it).
"""
import argparse
import os
import subprocess
import sys

from social_reward.cli import run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
PROMPTS = ["one red circle", "two blue squares", "three green triangles", "one yellow square", "two purple circles",
           "three orange squares", "one green triangle", "two red triangles"]


def before_after(before_png, after_png, out_png, before_reward, after_reward, scale=3):
    """The validation grids of the first and last step, one above the other, enlarged, with their mean reward."""
    from PIL import Image, ImageDraw

    before, after = Image.open(before_png), Image.open(after_png)
    width, height = before.width * scale, before.height * scale
    canvas = Image.new("RGB", (width + 110, 2 * height + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (image, label, value) in enumerate(((before, "before", before_reward), (after, "after", after_reward))):
        canvas.paste(image.resize((width, height), Image.NEAREST), (110, row * (height + 10)))
        draw.text((4, row * (height + 10) + height // 2 - 10), f"{label}\nreward {value:.4f}", fill="black")
    canvas.save(out_png)
    return out_png


def run_demo(out="demo_generator_out", scorer=None, steps=200, sampling_steps=4, resolution=32, batch_size=4,
             learning_rate=1e-2, seed=0):
    """Make the tiny pipeline and (without `scorer`) the random tiny CLIP reward, fine-tune, report and draw."""
    import pandas as pd
    import torch

    from social_reward.generators.generate import generate
    from social_reward.models.clip import load_model
    from social_reward.scoring.leaderboard import evaluate_generators
    from social_reward.synthetic.pipelines import make_tiny_pipeline

    os.makedirs(out, exist_ok=True)
    pipeline = make_tiny_pipeline(os.path.join(out, "tiny-sd"), seed=seed)
    prompts = os.path.join(out, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    if scorer is None:
        torch.manual_seed(seed)
        init = os.path.join(out, "reward_clip.pth")
        torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), init)
        scorer = f"clip:{init},model={TINY_CLIP}"
    save_folder = os.path.join(out, "lora")
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    os.path.join(HERE, "finetune_generator.py"), "--pretrained_model_name_or_path", pipeline, "--prompts", prompts,
                    "--validation_prompts", prompts, "--scorer", scorer, "--method", "draft",
                    "--sampling_steps", str(sampling_steps), "--grad_steps", "1", "--guidance_scale", "1",
                    "--resolution", str(resolution), "--train_batch_size", str(batch_size), "--learning_rate",
                    str(learning_rate), "--max_train_steps", str(steps), "--checkpointing_steps", str(steps // 4),
                    "--output_dir", save_folder, "--seed", str(seed)],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    val = pd.read_csv(os.path.join(save_folder, "metrics.csv")).dropna(subset=["val_reward"])
    for step, value in zip(val.step, val.val_reward):
        print(f"step {step:4d}: validation reward {value:.4f}")
    picture = before_after(os.path.join(save_folder, "validation-0.png"),
                           os.path.join(save_folder, f"validation-{steps}.png"), os.path.join(out, "before_after.png"),
                           val.val_reward.iloc[0], val.val_reward.iloc[-1])
    print(f"the same seeds before and after fine-tuning: {picture}")
    # the paper's table for this pair: both generators on the same prompts and noises, then evaluate_generators.py
    generations = os.path.join(out, "generations")
    for name, lora in (("base", None), ("tuned", save_folder)):
        generate(pipeline, prompts, name, generations, samples=4, lora=lora, resolution=resolution,
                 num_inference_steps=sampling_steps, guidance_scale=1.0, seed=seed + 1, device="cpu", overwrite=True)
    _, rates = evaluate_generators([os.path.join(generations, "generations.parquet")], {"reward": scorer},
                                   out=os.path.join(out, "evaluation"), device="cpu", num_workers=0, overwrite=True)
    rate = rates[(rates.generator == "tuned") & (rates.other == "base")].iloc[0]
    print(f"tuned over base under the reward, {rate['items']} images on other noises: win rate "
          f"{100 * rate.win_rate:.1f}% (95% interval {100 * rate.ci_low:.1f}-{100 * rate.ci_high:.1f}%)")
    print(f"load the LoRA: pipeline.load_lora_weights({save_folder!r}), or scripts/generate.py --lora {save_folder}")
    return val.val_reward.iloc[0], val.val_reward.iloc[-1], rate.win_rate



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_generator_out")
    parser.add_argument("--scorer", default=None, help="the reward, KIND:PATH[,key=value] (a scorer spec); default: a "
                        "random tiny CLIP")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    run_demo(os.path.abspath(args.out), args.scorer, args.steps)


if __name__ == "__main__":
    run_cli(main)
