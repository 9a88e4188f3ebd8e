"""scripts/compare.py with every scorer kind side by side, each a tiny random model saved in its peer's own layout
(nothing downloaded), on the demo's synthetic pairs and on the same images laid out as HPD v2's test.json and a
Pick-a-Pic shard. The numbers mean nothing but that every kind runs through one comparison; it prints
scripts/compare.py's table.

    python benchmarks/compare_all_scorers.py --pairs 12 --out /tmp/all-scorers
"""
import argparse
import json
import os
import sys
import time

import pandas as pd
import torch

from social_reward.models.clip import load_model
from social_reward.scorers.hpsv3 import ASK, INSTRUCTION
from social_reward.scoring.comparison import compare, markdown_table
from social_reward.synthetic.shapes import make_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' tiny peer models, reused
from test_imagereward import WORDS, tiny_imagereward_tensors  # noqa: E402
from test_scorers_and_compare import save_tiny_pickscore  # noqa: E402
from tiny_peers import save_tiny_hpsv3, save_tiny_mps  # noqa: E402

TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")


def tiny_clip(path, seed):
    torch.manual_seed(seed)
    model = load_model(TINY_CLIP, pretrained="none")[0]
    torch.save(model.state_dict(), path)
    return path, model.visual.output_dim


def tiny_scorers(folder):
    """{name: spec} of a tiny random model of every kind, saved under `folder`."""
    ours, width = tiny_clip(os.path.join(folder, "ours.pth"), 0)
    clip, _ = tiny_clip(os.path.join(folder, "ViT-L-14.pt"), 1)
    hps, _ = tiny_clip(os.path.join(folder, "hps.pt"), 2)
    torch.save({"state_dict": torch.load(hps, weights_only=True)}, hps)
    torch.manual_seed(3)
    mlp = {}
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        mlp[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
        mlp[f"layers.{index}.bias"] = torch.zeros(n_out)
    torch.save(mlp, os.path.join(folder, "aesthetic.pth"))
    from transformers import BertTokenizer
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(os.path.join(folder, "bert"))
    torch.save(tiny_imagereward_tensors(len(WORDS) + 7), os.path.join(folder, "ImageReward.pt"))
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                   "max_position_embeddings": 40, "vocab_size": len(WORDS) + 7}, f)
    hpsv3, base, _ = save_tiny_hpsv3(os.path.join(folder, "hpsv3"), [INSTRUCTION + ASK, " ".join(WORDS)])
    mps, processor, _ = save_tiny_mps(os.path.join(folder, "mps"))
    model = f",model={TINY_CLIP}"
    return {"ours": f"clip:{ours}{model}", "clip": f"clip:{clip}{model}", "hpsv2": f"hpsv2:{hps}{model}",
            "pickscore": f"pickscore:{save_tiny_pickscore(os.path.join(folder, 'pickscore'))}",
            "aesthetic": f"aesthetic:{os.path.join(folder, 'aesthetic.pth')},clip={ours}{model}",
            "imagereward": f"imagereward:{os.path.join(folder, 'ImageReward.pt')},tokenizer={folder}/bert,"
                           f"med_config={folder}/med_config.json",
            "hpsv3": f"hpsv3:{hpsv3},base={base},dtype=fp32", "mps": f"mps:{mps},processor={processor},dtype=fp32"}


def sources(folder, n_pairs):
    """The demo's pairs (a pair table), the same images as HPD v2's test.json (each prompt's images ranked, the
    preferred first) and as a Pick-a-Pic shard (the images' bytes, label_0 = 1 for the preferred)."""
    pairs = make_pairs(os.path.join(folder, "images"), n_pairs, seed=0)
    pairs.to_parquet(os.path.join(folder, "pairs.parquet"))
    entries = [{"prompt": r.prompt, "rank": [1, 2],
                "image_path": [os.path.relpath(r.pos_path, folder), os.path.relpath(r.neg_path, folder)]}
               for r in pairs.itertuples()]
    with open(os.path.join(folder, "test.json"), "w") as f:
        json.dump(entries, f)

    def png(path):
        return open(path, "rb").read()
    shard = pd.DataFrame({"caption": pairs.prompt, "jpg_0": [png(p) for p in pairs.neg_path],
                          "jpg_1": [png(p) for p in pairs.pos_path], "label_0": 0.0, "label_1": 1.0,
                          "has_label": True})
    shard.to_parquet(os.path.join(folder, "test-00000-of-00001.parquet"))
    return [os.path.join(folder, n) for n in ("pairs.parquet", "test.json", "test-00000-of-00001.parquet")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--out", default="all-scorers")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    specs = tiny_scorers(args.out)
    start = time.perf_counter()
    table = compare(sources(args.out, args.pairs), specs, out=os.path.join(args.out, "comparison"), prompts=4,
                    image_root=args.out, device="cpu", num_workers=0)
    print(markdown_table(table), end="")
    print(f"{len(specs)} scorers, {time.perf_counter() - start:.1f} s; written: {args.out}/comparison/table.csv, "
          f"table.md, agreement.csv, comparison.png")


if __name__ == "__main__":
    main()
