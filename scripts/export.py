"""Publish a checkpoint for other people's code: open_clip's `local-dir:` folder, or a transformers CLIPModel folder
(as PickScore ships), each with a README.md model card. The export is loaded back and checked against the checkpoint
(image and text embeddings within 1e-4) before it appears under --out.

    python scripts/export.py clip_model/clip_epoch_4_global_step_final.pth --to open_clip --out social-reward-open_clip
    python scripts/export.py clip_model/clip_epoch_4_global_step_final.pth --to transformers --out social-reward-hf

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:social-reward-open_clip")
    model = transformers.CLIPModel.from_pretrained("social-reward-hf")   # processor: CLIPProcessor, same folder

The work is social_reward.models.export.export.
"""
import argparse

from social_reward.cli import run_cli
from social_reward.models import DEFAULT_MODEL, EXPORT_FORMATS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="fine-tuned weights (OpenAI-format state dict, .pth or .safetensors)")
    parser.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="the library whose layout to write")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty, or --overwrite)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or model-config .json")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = parser.parse_args()
    from social_reward.models.export import export

    difference = export(args.checkpoint, args.to, args.out, args.model, args.overwrite)
    print(f"wrote {args.out} ({args.to}); its embeddings are within {difference:.1e} of {args.checkpoint}'s")


if __name__ == "__main__":
    run_cli(main)
