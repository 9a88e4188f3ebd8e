"""scripts/evaluate_generators.py against validate.py on the same images, as whole processes, and the differentiable
reward's tensor path (social_reward.reward.differentiable.Reward) against its PIL path (the measured bound of tensor vs
PIL resizing).

    python benchmarks/generators_speed.py                       # ViT-L/14 (random weights, fp16 file), CPU
    python benchmarks/generators_speed.py --model small --images 24

Two "generators" of `--images` 512 x 512 JPEGs each (cut from the photographs scikit-image ships), one prompt per
item. scripts/evaluate_generators.py scores all of them under one scorer (an empty --out, so every image is encoded);
validate.py scores the same images as pairs (generator A's image against generator B's for each prompt). Both encode
each image and prompt once; the time per image is the process's wall time over the images it scored.
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
# bench.py beside this file (social_reward itself is pip-installed)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import MODELS, PROMPTS, make_photographs  # noqa: E402


def make_generations(folder, images_per_generator):
    import pandas as pd
    from PIL import Image
    photos = make_photographs(folder, 10)
    rows = []
    for g, generator in enumerate(("A", "B")):
        for i in range(images_per_generator):
            with Image.open(photos[(i + 3 * g) % len(photos)]) as photo:
                side = min(photo.size)
                box = (i * 37 % (photo.size[0] - side + 1), 0, i * 37 % (photo.size[0] - side + 1) + side, side)
                path = os.path.join(folder, f"{generator}_{i}.jpg")
                photo.crop(box).resize((512, 512), Image.BICUBIC).save(path, quality=92)
            rows.append({"generator": generator, "prompt": f"{PROMPTS[i % len(PROMPTS)]}, take {i}", "image": path})
    table = pd.DataFrame(rows)
    pairs = pd.DataFrame({"prompt": table.prompt[:images_per_generator].values,
                          "pos_path": table.image[:images_per_generator].values,
                          "neg_path": table.image[images_per_generator:].values})
    return table, pairs


def timed(command):
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def tensor_vs_pil(spec, paths, prompts):
    """The largest |reward(tensor) - reward(PIL)| over the images, and the scores' spread (std), on this scorer."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    from social_reward.reward.differentiable import Reward
    reward = Reward.load(spec)
    with torch.no_grad():
        images = [Image.open(p).convert("RGB") for p in paths]
        on_pil = torch.cat([reward(images[i:i + 8], prompts[i:i + 8]) for i in range(0, len(images), 8)])
        on_tensors = torch.cat([reward(torch.stack([to_tensor(im) for im in images[i:i + 8]]), prompts[i:i + 8])
                                for i in range(0, len(images), 8)])
    return float((on_tensors - on_pil).abs().max()), float(on_pil.std())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="vit-l")
    parser.add_argument("--images", type=int, default=24, help="images per generator")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch
    from social_reward.models.clip import load_model
    model = MODELS[args.model]
    with tempfile.TemporaryDirectory() as folder:
        table, pairs = make_generations(folder, args.images)
        table.to_parquet(os.path.join(folder, "generations.parquet"))
        pairs.to_parquet(os.path.join(folder, "pairs.parquet"))
        torch.manual_seed(0)
        weights = os.path.join(folder, "weights.pth")
        torch.save({k: v.half() for k, v in load_model(model, pretrained="none")[0].state_dict().items()}, weights)
        spec = f"ours=clip:{weights},model={model}"
        n = len(table)
        evaluate = timed([sys.executable, "scripts/evaluate_generators.py", os.path.join(folder, "generations.parquet"),
                          "--scorer", spec, "--out", os.path.join(folder, "eval"), "--device", "cpu",
                          "--batch_size", "8"])
        validate = timed([sys.executable, "validate.py", os.path.join(folder, "pairs.parquet"), "--model", model,
                          "--checkout_path", weights, "--device", "cpu", "--batch_size", "8"])
        bound, spread = tensor_vs_pil(spec.split("=", 1)[1], list(table.image), list(table.prompt))
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "torch": torch.__version__, "model": args.model, "images": n,
               "evaluate_generators_s": evaluate, "evaluate_generators_images_per_s": n / evaluate,
               "validate_s": validate, "validate_images_per_s": n / validate,
               "reward_tensor_vs_pil_max_abs": bound, "reward_score_std": spread}
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
