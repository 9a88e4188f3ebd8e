"""The scorer kinds, by name: a spec KIND:PATH[,key=value...] names one, and the kind's own module checks its files
and loads it. Adding a kind is one module under scorers/ (with `check` and `load`) and one line in KINDS.

    scorer = load_scorer("clip:clip_epoch_4_global_step_final.pth")                  # ours (OpenAI format)
    scorer = load_scorer("clip:openai")                                              # OpenAI's ViT-L/14
    scorer = load_scorer("hpsv2:HPS_v2.1_compressed.pt")                             # {"state_dict": open_clip ViT-H-14}
    scorer = load_scorer("pickscore:PickScore_v1/")                                  # transformers CLIPModel folder
    scorer = load_scorer("aesthetic:sac+logos+ava1-l14-linearMSE.pth,clip=ViT-L-14.pt")
    scorer = load_scorer("imagereward:ImageReward.pt,tokenizer=bert-base-uncased/")
    scorer = load_scorer("hpsv3:HPSv3.safetensors,base=Qwen2-VL-7B-Instruct/")      # Qwen2-VL-7B + HPSv3's head
    scorer = load_scorer("mps:MPS_overall_checkpoint.pth,processor=CLIP-ViT-H-14-laion2B-s32B-b79K/")

Nothing is downloaded: every file comes from the spec. A kind's module is imported when a spec of that kind is
checked or loaded, so parsing a spec imports no model library.
"""
import importlib

from social_reward.errors import InputError

# kind -> the options its spec takes; the module social_reward.scorers.<kind> holds check(spec, path, options) and
# load(path, options, device) -> Scorer
KINDS = {"clip": ("model",), "hpsv2": ("model",), "pickscore": (), "aesthetic": ("clip", "model"),
         "imagereward": ("tokenizer", "med_config"), "hpsv3": ("base", "dtype"), "mps": ("processor", "dtype")}


def kind_module(kind):
    return importlib.import_module(f"social_reward.scorers.{kind}")


def parse_spec(spec):
    """KIND:PATH[,key=value...] -> (kind, path, options); a mistake raises InputError naming the spec."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise InputError(f"--scorer {spec}: unknown kind {kind!r}; give KIND:PATH with KIND one of {', '.join(KINDS)}")
    path, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in KINDS[kind]:
            raise InputError(f"--scorer {spec}: unknown option {key!r} for {kind} "
                             f"(options: {', '.join(KINDS[kind]) or 'none'})")
        options[key] = value
    if not path:
        raise InputError(f"--scorer {spec}: no path")
    return kind, path, options


def check_spec(spec):
    """Cheap checks of a spec's files before any model loads (the kind's own: the file or folder exists and is of the
    right kind); returns (kind, path, options)."""
    kind, path, options = parse_spec(spec)
    kind_module(kind).check(spec, path, options)
    return kind, path, options


def load_scorer(spec, device="cpu"):
    """A Scorer (scorers/base.py) from a spec; nothing is downloaded (`clip:openai`, `clip=openai` offline say which
    file to pass)."""
    kind, path, options = check_spec(spec)
    return kind_module(kind).load(path, options, device)


def parse_named_scorers(named_specs):
    """NAME=SPEC strings (or a {name: spec} dict) -> {name: spec}, checked (kinds, options, files) before any model
    loads."""
    if isinstance(named_specs, dict):
        named_specs = [f"{name}={spec}" for name, spec in named_specs.items()]
    scorers = {}
    for named in named_specs:
        name, eq, spec = named.partition("=")
        if not eq or not name or ":" in name:
            raise InputError(f"--scorer {named}: give NAME=KIND:PATH, e.g. ours=clip:clip_final.pth")
        if name in scorers:
            raise InputError(f"--scorer {named}: the name {name!r} is given twice")
        check_spec(spec)
        scorers[name] = spec
    if not scorers:
        raise InputError("give at least one --scorer NAME=KIND:PATH")
    return scorers
