"""Prompts from the files users have: a text file (one a line), a json list, or a pair source (its prompts).

    prompts = read_prompts(["prompts.txt"], "--prompts")
"""
import glob
import json
import os

import pandas as pd

from social_reward.errors import InputError


def read_prompts(paths, flag="--prompts"):
    """The prompts of a text file (one a line; blank lines skipped), a json list of strings, or a pair source that
    sources.read_source reads (a pair table, Pick-a-Pic shards, an HPD v2 or ImageReward json: its distinct
    prompts, in order). `paths`: a path or a list of them; `flag` names them in a message."""
    from social_reward.data.sources import read_source
    paths = [paths] if isinstance(paths, str) else list(paths)
    named = " ".join(paths)
    for path in paths:
        if not glob.glob(path):
            raise InputError(f"{flag} {path}: no such file")
    if len(paths) == 1 and os.path.isfile(paths[0]) and not paths[0].endswith(".parquet"):
        with open(paths[0], encoding="utf-8") as f:
            text = f.read()
        prompts = None
        if paths[0].endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError as e:
                raise InputError(f"{flag} {paths[0]}: not valid json ({e})") from None
            if isinstance(data, list) and all(isinstance(p, str) for p in data):
                prompts = data
        else:
            prompts = text.splitlines()
        if prompts is not None:
            prompts = [p.strip() for p in prompts if p.strip()]
            if not prompts:
                raise InputError(f"{flag} {named}: no prompts in it (empty, or only blank lines)")
            return prompts
    prompts = list(pd.unique(read_source(paths if len(paths) > 1 else paths[0], check_files=False).pairs.prompt))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"{flag} {named}: no prompts in it")
    return prompts
