"""Training and validation as a user runs them, against the original's costs (benchmarks/original.py).

    python benchmarks/bench.py                         # small config and ViT-L/14, CPU, fp32: about 15 minutes
    python benchmarks/bench.py --models small --steps 3 --json bench.json

Each measurement runs in its own process, so peak memory (RSS) is that run's alone; the scripts run with their
defaults (on a CPU: no DataLoader workers). Training: the README's mode,
batch 2, a weights file to start from (random weights, fp16 as OpenAI ships them), photographs as 1-4 MP JPEGs.
Validation: a couple of dozen images making two dozen pairs (preference data repeats images), and pairs where
nothing repeats. Decoding: JPEG images/s at full scale and at reduced scale (PIL draft), and the scores' change.
"""
import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# original.py beside this file (social_reward itself is pip-installed)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

MODELS = {"small": os.path.join(ROOT, "assets", "tiny-clip.json"), "vit-l": "ViT-L-14-quickgelu"}
MODE = "visual_upper_layers_textual_upper_layers"  # the README's recipe
PROMPTS = ["an astronaut in a white spacesuit", "a ginger tabby cat", "a cup of coffee on a saucer",
           "a rocket on the launch pad", "galaxies in deep space", "a motorcycle in a workshop",
           "old coins on a table", "the cratered surface of the moon"]


def make_photographs(folder, count):
    """`count` JPEGs of 1 to 4 megapixels, cut and scaled from the photographs scikit-image ships."""
    import skimage
    from PIL import Image
    sources = [os.path.join(os.path.dirname(skimage.__file__), "data", n) for n in
               ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                "motorcycle_left.png", "coins.png", "moon.png", "retina.jpg", "ihc.png")]
    rng, paths = random.Random(0), []
    for i in range(count):
        megapixels = 1 + 3 * i / max(count - 1, 1)
        width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
        with Image.open(sources[i % len(sources)]) as source:
            image = source.convert("RGB").rotate(rng.uniform(-8, 8)).resize((width, width * 3 // 4), Image.BICUBIC)
        paths.append(os.path.join(folder, f"photo_{i}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def make_pairs(paths, n_pairs, repeat):
    """Pairs over `paths`: with `repeat`, each image and prompt appears in several pairs; without, none does."""
    import pandas as pd
    rng = random.Random(1)
    if repeat:
        rows = [(PROMPTS[i % len(PROMPTS)], *rng.sample(paths, 2)) for i in range(n_pairs)]
    else:
        rows = [(f"{PROMPTS[i % len(PROMPTS)]}, number {i}", paths[2 * i], paths[2 * i + 1]) for i in range(n_pairs)]
    return pd.DataFrame(rows, columns=["prompt", "pos_path", "neg_path"])


def generator_run_files(folder, prompts):
    """What the generator benchmarks train with: a prompts file and the tiny CLIP's random init (seed 0) as the
    reward, in `folder`; returns (prompts path, reward path)."""
    import torch
    from social_reward.models.clip import load_model
    path = os.path.join(folder, "prompts.txt")
    with open(path, "w") as f:
        f.write("\n".join(prompts) + "\n")
    torch.manual_seed(0)
    reward = os.path.join(folder, "reward.pth")
    torch.save(load_model(MODELS["small"], pretrained="none")[0].state_dict(), reward)
    return path, reward


def peak_rss_gb():
    """This process's peak RSS in GiB. On Linux, VmHWM: getrusage's ru_maxrss starts from the peak of the process
    that spawned this one (the kernel records the old memory's high-water mark at exec), so a worker spawned by a
    parent holding two checkpoints would report the parent's 4 GB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB, as Linux reports it


def worker(args):
    """One measurement, in this process; prints its result as JSON."""
    import pandas as pd
    from original import original_scores, original_train
    from torch.optim.optimizer import register_optimizer_step_post_hook
    if args.impl == "ours":
        from social_reward.cli import keep_freed_memory
        keep_freed_memory()  # as the scripts' run_cli does
    pairs = pd.read_parquet(args.pairs)
    stamps = [time.perf_counter()]
    start = stamps[0]
    if args.worker == "epochs":  # a whole run of the README's recipe, as a user launches it
        if args.impl == "original":
            original_train(pairs, MODE, args.batch_size, args.n_epochs, args.save_folder, args.weights, 3e-5, args.model)
        else:
            from social_reward.training.clip import finetune_model  # train_pair_pos_neg.py's work
            finetune_model(pairs, MODE, args.batch_size, args.n_epochs, args.save_folder, checkout_path=args.weights,
                           learning_rate=3e-5, model=args.model, trunk_cache=args.trunk_cache,
                           trunk_cache_dtype=args.trunk_cache_dtype)
        result = {"run_s": time.perf_counter() - start}
    elif args.worker == "train":
        # a timestamp after every optimizer step: the training code is timed as it is, with nothing added to it
        register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
        with tempfile.TemporaryDirectory() as save_folder:
            if args.impl == "ours":
                from social_reward.training.clip import finetune_model
                finetune_model(pairs, MODE, args.batch_size, 1, save_folder, checkout_path=args.weights,
                               learning_rate=3e-5, model=args.model)
            else:
                original_train(pairs, MODE, args.batch_size, 1, save_folder, args.weights, 3e-5, args.model)
            end = time.perf_counter()
        steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first step (warm-up) is left out
        step_s = statistics.median(steps)
        result = {"step_s": step_s, "pairs_per_s": args.batch_size / step_s, "steps": len(steps) + 1,
                  "until_first_step_s": stamps[1] - start, "after_last_step_s": end - stamps[-1], "run_s": end - start}
    else:
        if args.impl == "ours":
            from social_reward.scoring.validation import validate_image_pair_classifier  # validate.py's work
            accuracy = validate_image_pair_classifier(pairs, args.weights, "cpu", model=args.model)
        else:
            pos, neg = original_scores(pairs, args.weights, args.model, batch_size=args.batch_size)
            accuracy = (pos >= neg).float().mean().item()
        result = {"run_s": time.perf_counter() - start, "accuracy": accuracy}
    print(json.dumps({**result, "peak_rss_gb": peak_rss_gb()}))


def measure(what, impl, model, weights, pairs_file, batch_size, extra=(), env=None):
    command = [sys.executable, os.path.abspath(__file__), "--worker", what, "--impl", impl, "--model", model,
               "--weights", weights, "--pairs", pairs_file, "--batch_size", str(batch_size), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if result.returncode:
        raise SystemExit(f"{what}/{impl} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cache_benchmark(model, weights, folder, pairs_file, validation_file, n_epochs, batch_size):
    """The README's recipe (n_epochs, batch_size) as whole processes: the original, ours, ours with --trunk_cache
    (an empty cache: its filling is in the time; then the same run again on the filled cache), with fp16 and fp32
    entries; the final weights' distance and validation accuracy against ours without the cache."""
    import glob
    import shutil
    import torch
    from social_reward.training.trunk_cache import read_entry
    runs, finals = {}, {}
    for name, impl, dtype in (("original", "original", None), ("ours", "ours", None), ("cached_fp16", "ours", "fp16"),
                              ("cached_fp16_again", "ours", "fp16"), ("cached_fp32", "ours", "fp32")):
        save_folder = os.path.join(folder, f"run-{name}")
        extra = ["--n_epochs", str(n_epochs), "--save_folder", save_folder]
        if dtype:
            extra += ["--trunk_cache", os.path.join(folder, "trunk-cache"), "--trunk_cache_dtype", dtype]
        t = time.perf_counter()
        runs[name] = measure("epochs", impl, model, weights, pairs_file, batch_size, extra)
        runs[name]["process_s"] = time.perf_counter() - t
        final = os.path.join(save_folder, f"clip_epoch_{n_epochs - 1}_global_step_final.pth")
        if impl == "ours" and name != "cached_fp16_again":
            finals[name] = torch.load(final, weights_only=True)
            runs[name]["val_accuracy"] = measure("validate", "ours", model, final, validation_file, 1024)["accuracy"]
        shutil.rmtree(save_folder)
        print(name, runs[name], file=sys.stderr)
    start = {k: v.float() for k, v in torch.load(weights, weights_only=True).items()}
    moved = sum(((finals["ours"][k] - start[k]) ** 2).sum() for k in start).sqrt()
    for name in ("cached_fp16", "cached_fp32"):
        apart = sum(((finals[name][k] - finals["ours"][k]) ** 2).sum() for k in start).sqrt()
        runs[name]["weights_apart_over_moved"] = (apart / moved).item()
    for tower in ("image", "text"):
        entries = glob.glob(os.path.join(folder, "trunk-cache", f"{tower}-*", "*.safetensors"))
        sizes = {}
        for path in entries:
            sizes.setdefault(str(read_entry(path).dtype).removeprefix("torch."), []).append(os.path.getsize(path))
        runs[f"cache_{tower}_MB_per_1000"] = {dtype: 1000 * statistics.mean(s) / 1e6 for dtype, s in sizes.items()}
    return runs


def precision_benchmark(model, weights, folder, pairs_file, train_file, rounds=3, batch_size=8):
    """validate.py as a user runs it (a whole process, --batch_size 8) in fp32 and --precision bf16, against the
    original's validation on OpenAI's clip package (benchmarks/original_validate.py), in `rounds` interleaved rounds:
    median wall times, the accuracy printed, the largest score change; and a training step under accelerate's
    --mixed_precision bf16 against fp32."""
    import pandas as pd
    commands = {
        "original": [sys.executable, os.path.join(ROOT, "benchmarks", "original_validate.py"), pairs_file, weights,
                     str(batch_size)],
        "fp32": [sys.executable, "validate.py", pairs_file, "--model", model, "--checkout_path", weights,
                 "--batch_size", str(batch_size), "--scores_out"],
        "bf16": [sys.executable, "validate.py", pairs_file, "--model", model, "--checkout_path", weights,
                 "--batch_size", str(batch_size), "--precision", "bf16", "--scores_out"]}
    times, out = {name: [] for name in commands}, {}
    for _ in range(rounds):
        for name, command in commands.items():
            scores = os.path.join(folder, f"scores-{name}.csv")
            t = time.perf_counter()
            result = subprocess.run(command + [scores], capture_output=True, text=True, cwd=ROOT)
            times[name].append(time.perf_counter() - t)
            if result.returncode:
                raise SystemExit(f"validate {name} failed:\n{result.stderr[-3000:]}")
            out[f"{name}_accuracy"] = float(result.stdout.split("Accuracy: ")[1].split("%")[0]) / 100
    scores = {name: pd.read_csv(os.path.join(folder, f"scores-{name}.csv")) for name in commands}
    for name in ("fp32", "bf16"):
        out[f"{name}_s"] = statistics.median(times[name])
        out[f"{name}_x_original"] = statistics.median(times["original"]) / out[f"{name}_s"]
        change = pd.concat([(scores[name][c] - scores["original"][c]).abs() for c in ("pos_score", "neg_score")])
        out[f"{name}_max_score_change_vs_original"] = change.max()
        out[f"{name}_score_changes_largest"] = sorted(change.tolist())[-3:]
    out["original_s"], out["times"] = statistics.median(times["original"]), times
    for name, env in (("train_fp32", {}), ("train_bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"})):
        out[name] = measure("train", "ours", model, weights, train_file, 2, env=env)
    return out


def decode_benchmark(paths, model, weights, folder):
    """Images/s decoding JPEG files in full (the default, the original's), through PIL's draft (--fast_decode), and
    from the same bytes stored in a Pick-a-Pic-layout parquet shard; how much the draft moves the scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from social_reward.models.clip import load_model
    from social_reward.data.images import draft_size, open_image
    from social_reward.data.cells import cell_ref
    clip, preprocess, tokenizer = load_model(model, checkout_path=weights)
    shard = os.path.join(folder, "decode-shard.parquet")
    data = [open(p, "rb").read() for p in paths]
    pq.write_table(pa.table({"caption": PROMPTS[:1] * len(paths), "jpg_0": pa.array(data, pa.binary()),
                             "jpg_1": pa.array(data, pa.binary()), "label_0": [1.0] * len(paths),
                             "label_1": [0.0] * len(paths)}), shard, row_group_size=100)
    cells = [cell_ref(shard, i, "jpg_0") for i in range(len(paths))]
    out = {}
    for label, images, fast in (("full_scale", paths, False), ("draft", paths, True), ("parquet_bytes", cells, False)):
        t = time.perf_counter()
        batch = torch.stack([open_image(p, preprocess, draft_size(preprocess, fast)) for p in images])
        out[f"{label}_images_per_s"] = len(paths) / (time.perf_counter() - t)
        with torch.no_grad():
            out[f"{label}_features"] = clip.encode_image(batch, normalize=True)
    text = clip.encode_text(tokenizer(PROMPTS), normalize=True).detach()
    full, draft = out.pop("full_scale_features") @ text.T, out.pop("draft_features") @ text.T
    out["bytes_equal_files"] = bool(torch.equal(out.pop("parquet_bytes_features") @ text.T, full))
    out["max_score_change"] = (full - draft).abs().max().item()
    out["same_best_prompt"] = bool((full.argmax(1) == draft.argmax(1)).all())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,vit-l")
    parser.add_argument("--steps", type=int, default=4, help="training steps measured (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--what", default="train,validate,decode", help="which measurements (comma-separated)")
    parser.add_argument("--epochs", type=int, default=10, help="cache: epochs of the README's recipe")
    parser.add_argument("--cache_pairs", type=int, default=16, help="cache: pairs (distinct images) trained on")
    parser.add_argument("--worker", choices=["train", "validate", "epochs"], help=argparse.SUPPRESS)
    parser.add_argument("--n_epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save_folder", help=argparse.SUPPRESS)
    parser.add_argument("--trunk_cache", help=argparse.SUPPRESS)
    parser.add_argument("--trunk_cache_dtype", default="fp16", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from social_reward.models.clip import load_model
    results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size,
               "mode": MODE, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        photos = make_photographs(folder, max(48, 24 + 2 * args.cache_pairs))
        train_file, repeat_file, distinct_file = (os.path.join(folder, f) for f in ("train.parquet", "repeat.parquet",
                                                                                   "distinct.parquet"))
        make_pairs(photos, args.batch_size * (args.steps + 1), repeat=True).to_parquet(train_file)
        make_pairs(photos[:24], 24, repeat=True).to_parquet(repeat_file)  # 24 images make 24 pairs
        make_pairs(photos, 24, repeat=False).to_parquet(distinct_file)  # 48 images, 24 prompts, no repeats
        for label in args.models.split(","):
            model = MODELS[label]
            weights = os.path.join(folder, f"{label}.pth")
            torch.manual_seed(0)
            torch.save({k: v.half() for k, v in load_model(model, pretrained="none")[0].state_dict().items()}, weights)
            run = {}
            for impl in ("ours", "original"):
                if "train" in args.what:
                    run[f"train_{impl}"] = measure("train", impl, model, weights, train_file, args.batch_size)
                for data, pairs_file in (("repeat", repeat_file), ("distinct", distinct_file)) if "validate" in args.what else ():
                    run[f"validate_{data}_{impl}"] = measure("validate", impl, model, weights, pairs_file, 1024)
                print(label, impl, "done", file=sys.stderr)
            if "decode" in args.what:
                run["decode"] = decode_benchmark(photos[:12], model, weights, folder)
            if "precision" in args.what:
                run["precision"] = precision_benchmark(model, weights, folder, distinct_file, train_file)
            if "cache" in args.what:
                cache_file = os.path.join(folder, "cache-train.parquet")
                make_pairs(photos[24:], args.cache_pairs, repeat=False).to_parquet(cache_file)
                run["cache"] = cache_benchmark(model, weights, folder, cache_file, distinct_file, args.epochs,
                                               args.batch_size)
            results["runs"][label] = run
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_table(results):
    print(f"{results['date']}, {results['machine']}, torch {results['torch']}, fp32, batch {results['batch_size']}, "
          f"mode {results['mode']}")
    if any("train_ours" in run for run in results["runs"].values()):
        print(f"{'model':6} {'what':22} {'ours':>12} {'original':>12} {'ratio':>7}   peak RSS GB ours / original")
    for label, run in results["runs"].items():
        if "train_ours" not in run:
            print_decode(label, run)
            print_precision(label, run)
            print_cache(label, run)
            continue
        ours, original = run["train_ours"], run["train_original"]
        print(f"{label:6} {'train pairs/s':22} {ours['pairs_per_s']:12.3f} {original['pairs_per_s']:12.3f} "
              f"{ours['pairs_per_s'] / original['pairs_per_s']:6.2f}x   {ours['peak_rss_gb']:.2f} / "
              f"{original['peak_rss_gb']:.2f} ({ours['peak_rss_gb'] / original['peak_rss_gb']:.2f})")
        print(f"{label:6} {'train s/step':22} {ours['step_s']:12.2f} {original['step_s']:12.2f}")
        print(f"{label:6} {'train whole run s':22} {ours['run_s']:12.1f} {original['run_s']:12.1f} "
              f"{original['run_s'] / ours['run_s']:6.2f}x   (before 1st step: {ours['until_first_step_s']:.1f} / "
              f"{original['until_first_step_s']:.1f} s; after last: {ours['after_last_step_s']:.1f} / "
              f"{original['after_last_step_s']:.1f} s)")
        for data in ("repeat", "distinct"):
            if f"validate_{data}_ours" not in run:
                continue
            ours, original = run[f"validate_{data}_ours"], run[f"validate_{data}_original"]
            print(f"{label:6} {'validate ' + data + ' s':22} {ours['run_s']:12.1f} {original['run_s']:12.1f} "
                  f"{original['run_s'] / ours['run_s']:6.2f}x   {ours['peak_rss_gb']:.2f} / {original['peak_rss_gb']:.2f}"
                  f"   accuracy {ours['accuracy'] * 100:.2f}% / {original['accuracy'] * 100:.2f}%")
        print_decode(label, run)
        print_precision(label, run)
        print_cache(label, run)


def print_precision(label, run):
    if "precision" not in run:
        return
    p = run["precision"]
    print(f"{label:6} validate distinct, whole process, batch 8: original (OpenAI clip package) {p['original_s']:.1f} s, "
          f"accuracy {p['original_accuracy'] * 100:.2f}%")
    for name in ("fp32", "bf16"):
        print(f"{label:6} validate distinct {name:4} {p[name + '_s']:8.1f} s {p[name + '_x_original']:6.2f}x the original   "
              f"accuracy {p[name + '_accuracy'] * 100:.2f}%, largest score change vs the original "
              f"{p[name + '_max_score_change_vs_original']:.2e}")
    fp32, bf16 = p["train_fp32"], p["train_bf16"]
    print(f"{label:6} train step, mixed precision bf16 {bf16['step_s']:.2f} s vs fp32 {fp32['step_s']:.2f} s: "
          f"{fp32['step_s'] / bf16['step_s']:.2f}x")


def print_cache(label, run):
    if "cache" not in run:
        return
    cache, original = run["cache"], run["cache"]["original"]
    print(f"{label:6} {'README recipe, whole process':30} {'s':>8} {'x original':>10} {'x ours':>7} {'peak GB':>8} "
          f"{'x orig':>6}  final weights vs ours, validation accuracy")
    for name in ("original", "ours", "cached_fp16", "cached_fp16_again", "cached_fp32"):
        r = cache[name]
        apart = f"{r['weights_apart_over_moved']:.4f} of the update" if "weights_apart_over_moved" in r else ""
        accuracy = f"{r['val_accuracy'] * 100:.2f}%" if "val_accuracy" in r else ""
        print(f"{label:6} {name:30} {r['process_s']:8.1f} {original['process_s'] / r['process_s']:9.2f}x "
              f"{cache['ours']['process_s'] / r['process_s']:6.2f}x {r['peak_rss_gb']:8.2f} "
              f"{r['peak_rss_gb'] / original['peak_rss_gb']:6.2f}  {apart} {accuracy}")
    for tower in ("image", "text"):
        sizes = ", ".join(f"{v:.0f} MB ({k})" for k, v in cache[f"cache_{tower}_MB_per_1000"].items())
        print(f"{label:6} cache size per 1,000 {tower}s: {sizes}")


def print_decode(label, run):
    if "decode" in run:
        decode = run["decode"]
        full = decode["full_scale_images_per_s"]
        print(f"{label:6} {'decode --fast_decode':22} {decode['draft_images_per_s']:12.1f} {full:12.1f} "
              f"{decode['draft_images_per_s'] / full:6.2f}x   1-4 MP JPEGs/s, draft vs full; max score change "
              f"{decode['max_score_change']:.5f}, same best prompt: {decode['same_best_prompt']}")
        print(f"{label:6} {'decode parquet bytes':22} {decode['parquet_bytes_images_per_s']:12.1f} {full:12.1f} "
              f"{decode['parquet_bytes_images_per_s'] / full:6.2f}x   1-4 MP JPEGs/s, Pick-a-Pic shard vs files (both "
              f"full); same scores: {decode['bytes_equal_files']}")


if __name__ == "__main__":
    main()
