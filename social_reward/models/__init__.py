"""The models: CLIP loading (open_clip names, configs, checkpoints), training modes, weights files, export.

The names a command's flags give before any model library loads live here, importing nothing: the paper's model,
OpenAI's CLIP ViT-L/14, which OpenAI trained with QuickGELU (open_clip's plain "ViT-L-14", nn.GELU, is another model
for these weights), and the layouts export.py writes.
"""
DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"
EXPORT_FORMATS = ("open_clip", "transformers")  # export.py: open_clip's local-dir: folder, a transformers CLIPModel
