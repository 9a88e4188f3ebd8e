"""Every reward model, one module a kind (clip, hpsv2, pickscore, aesthetic, imagereward, hpsv3, mps) behind one
registry (registry.py): `load_scorer("pickscore:PickScore_v1/")`.
"""
