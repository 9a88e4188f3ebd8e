"""Text-to-image generators: the diffusers families as one table, sampling for every family, LoRA, generation for
evaluation, and the fine-tuning methods (DRaFT, ReFL, GRPO) the generator trainer calls.
"""
