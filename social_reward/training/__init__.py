"""Both trainers (clip.py: the original's CLIP fine-tuning; generator.py: LoRA on a generator through a reward) and
what they share: flag checks, the non-finite guard, state folders, metrics.csv; the losses and the trunk cache.
"""
