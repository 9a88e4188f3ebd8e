import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback

import pandas as pd
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from social_reward.models.clip import load_model  # noqa: E402
from social_reward.synthetic.shapes import make_pairs  # noqa: E402

TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
# smaller still (32 px, 2 blocks a tower, 16 tokens): for tests that train until a model has learnt something
MICRO_CLIP = os.path.join(ROOT, "tests", "fixtures", "micro-clip.json")

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores (pytest.ini): a thread each, not two fighting
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the scripts the tests start too
    torch.set_num_threads(1)


def require_extra(extra, *modules):
    """Skip the calling test module when a package of pyproject.toml's `extra` is missing, saying the line that
    installs it. CI installs every extra and fails on any skip (.ci/run sets SOCIAL_REWARD_NO_SKIPS)."""
    for module in modules:
        pytest.importorskip(module, reason=f"needs the {extra} extra: pip install -e '.[{extra}]'")


def pytest_sessionfinish(session, exitstatus):
    """With SOCIAL_REWARD_NO_SKIPS (CI), a skipped test fails the run: CI always runs the whole suite."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("SOCIAL_REWARD_NO_SKIPS") and skipped and not hasattr(session.config, "workerinput"):
        reporter.write_line(f"SOCIAL_REWARD_NO_SKIPS: {len(skipped)} tests skipped; CI runs the whole suite "
                            f"(install everything: pip install -r requirements.txt)", red=True)
        session.exitstatus = 1


def run_script(script, *args, env=None):
    """`python SCRIPT ARGS` (from the repository's root) run in this process, as a subprocess.CompletedProcess with
    returncode, stdout and stderr: the script's own `__main__` block through runpy, so its flags, its one-line errors
    and what it writes are the command line's, without a fresh interpreter importing torch and open_clip (about 5 s a
    run here). An exception that escapes is a traceback on stderr and status 1, as Python's. `env`: variables set for
    the run. What needs a process of its own (a signal, torchrun, a launcher's environment) runs as one.

    What a fresh process would not inherit is kept out, and what the run changes for the rest of the process is
    undone: its warnings go to its stderr under Python's default filters, each shown once per run (not pytest's
    filters and record); logging's stderr handlers write to its stderr; accelerate's process-wide state starts and
    ends empty; and the C library's memory setting (cli.keep_freed_memory, which run_cli applies for a
    script's own process) is not applied to this one.

        result = run_script("validate.py", pairs_file, "--batch_size", "0")
        assert result.returncode == 2 and result.stderr.startswith("error:")
    """
    import warnings

    from social_reward import cli
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, os.getcwd(), {name: os.environ.get(name) for name in env or {}}, cli.keep_freed_memory
    sys.argv = [script, *map(str, args)]
    os.environ.update(env or {})
    os.chdir(ROOT)
    cli.keep_freed_memory = lambda: None
    reset_accelerate_state()
    streams = stderr_handlers()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()  # also forgets which warnings were shown already
            for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)  # Python's defaults, as a script's process has them
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = (lambda message, category, filename, lineno, file=None, line=None:
                                    stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
            for handler in streams:
                handler.stream = stderr  # not setStream: it flushes the old stream, maybe a closed capture file
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                returncode = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        for name, value in saved[2].items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        cli.keep_freed_memory = saved[3]
        reset_accelerate_state()
        for handler in stderr_handlers():  # those made during the run, too
            if handler.stream is stderr:
                handler.stream = sys.stderr
    return subprocess.CompletedProcess([script, *map(str, args)], returncode, stdout.getvalue(), stderr.getvalue())


def stderr_handlers():
    """logging's plain stream handlers (transformers', diffusers', a script's basicConfig), which a library binds to
    the sys.stderr of the moment it made them; pytest's own capture handlers are subclasses, left alone."""
    import logging
    loggers = [logging.getLogger()] + [logger for logger in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(logger, logging.Logger)]
    return [handler for logger in loggers for handler in logger.handlers if type(handler) is logging.StreamHandler]


def reset_accelerate_state():
    """accelerate's singletons (the process's Accelerator state, gradient accumulation's) back to empty, as in a
    fresh process; nothing when accelerate is not imported yet."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture
def shapes_pairs(tmp_path):
    """24 synthetic pairs whose preferred image shows the prompt, with their PNGs in tmp_path."""
    return make_pairs(str(tmp_path / "images"), 24, seed=0)


# sizes and modes a scorer's preprocessing must take: RGB larger and smaller than 224, palette, RGBA, a strip, 1-bit
MIXED_IMAGES = [((300, 260), "RGB"), ((120, 200), "P"), ((230, 230), "RGBA"), ((500, 90), "RGB"), ((260, 240), "1")]


def mixed_mode_images(folder, kinds=MIXED_IMAGES):
    """PNGs of noise, one of each (size, mode) in `kinds`, written to `folder`; their paths."""
    from PIL import Image
    paths = []
    for i, (size, mode) in enumerate(kinds):
        image = Image.merge("RGB", [Image.effect_noise(size, 40 + 10 * c + i) for c in range(3)])
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        paths.append(os.path.join(folder, f"{i}.png"))
        image.save(paths[-1])
    return paths


def tensor_with_grad(path):
    """An image file's pixels as the 1 x 3 x H x W float tensor in [0, 1] a generator hands a reward, requiring grad."""
    import numpy as np
    from PIL import Image
    return (torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)


def assert_gradient_reaches_the_pixels(reward, pixels, prompt):
    """The reward of `pixels` (tensor_with_grad) back-propagates to them: what ReFL and DRaFT need of a scorer."""
    reward(pixels, [prompt]).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def save_tiny_init(path, model=TINY_CLIP):
    """A random-init tiny CLIP (seed 0) saved at `path` as an OpenAI-format state dict; returns the path."""
    torch.manual_seed(0)
    torch.save(load_model(model, pretrained="none")[0].state_dict(), path)
    return path


@pytest.fixture
def micro_init(tmp_path):
    """MICRO_CLIP's random init (seed 0), as tiny_init."""
    return save_tiny_init(str(tmp_path / "micro-init.pth"), MICRO_CLIP)


@pytest.fixture(scope="session")
def trained_micro(tmp_path_factory):
    """MICRO_CLIP trained from its init on 160 synthetic pairs (4 epochs, batch 16, lr 5e-4, mode "all") with each
    loss, made once for the whole run (the xdist workers share it through a lock):
    {"pairs": DataFrame, "init": path, "triplet": final checkpoint, "pairwise": final checkpoint}."""
    from filelock import FileLock
    from train_pair_pos_neg import finetune_model
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared  # the workers' common folder
    folder = shared / "trained_micro"
    with FileLock(str(shared / "trained_micro.lock")):
        if not (folder / "done").exists():
            pairs = make_pairs(str(folder / "images"), 160, seed=3)
            pairs.to_parquet(folder / "pairs.parquet")
            init = save_tiny_init(str(folder / "init.pth"), MICRO_CLIP)
            for loss_name in ("pairwise", "triplet"):
                final = finetune_model(pairs, "all", batch_size=16, n_epochs=4, save_folder=str(folder / loss_name),
                                       loss_name=loss_name, checkout_path=init, learning_rate=5e-4, model=MICRO_CLIP,
                                       num_workers=0)
                (folder / f"{loss_name}.path").write_text(final)
            (folder / "done").write_text("")
    return {"pairs": pd.read_parquet(folder / "pairs.parquet"), "init": str(folder / "init.pth"),
            **{name: (folder / f"{name}.path").read_text() for name in ("pairwise", "triplet")}}


@pytest.fixture
def tiny_init(tmp_path):
    """A random-init tiny CLIP saved as an OpenAI-format state dict: the same start for every run in a test."""
    return save_tiny_init(str(tmp_path / "init.pth"))


def assert_same_steps(ours, expected, start, learning_rate):
    """Two runs moved the same tensors, and each element the same way wherever the step was made by a gradient.

    Adam's step is lr * m / (sqrt(v) + eps): where a gradient is float noise (exactly zero in exact arithmetic, as
    for the attention key biases) its step is noise of up to lr, whatever the order of the float reductions. So the
    key biases are left out, and directions and values are compared where the reference stepped by more than lr / 2,
    which must be three quarters of the elements that moved.
    """
    moved = {k for k in start if not torch.equal(expected[k], start[k])}
    assert moved == {k for k in start if not torch.equal(ours[k], start[k])}
    clear_elements = moved_elements = 0
    for name in moved:
        expected_step, our_step = expected[name] - start[name], ours[name] - start[name]
        clear = expected_step.abs() > learning_rate / 2
        if name.endswith("attn.in_proj_bias"):  # the key bias: softmax ignores a shift of a query's logits
            third = len(clear) // 3
            clear[third:2 * third] = False
        assert torch.equal(torch.sign(expected_step[clear]), torch.sign(our_step[clear])), name
        assert torch.allclose(expected_step[clear], our_step[clear], rtol=0, atol=0.2 * learning_rate), name
        clear_elements += clear.sum().item()
        moved_elements += (expected_step != 0).sum().item()  # e.g. embeddings of tokens never seen do not move
    assert clear_elements > 0.75 * moved_elements, (clear_elements, moved_elements)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of tiny diffusion models: their kernels are too small to share, and idle threads spin
    on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline (random weights, SD's layout) saved with save_pretrained, loaded by path."""
    from social_reward.synthetic.pipelines import make_tiny_pipeline
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """tiny_pipelines(family, t5=True): a tiny pipeline of the family (sd, sdxl, sd3, flux; random weights, tokenizers
    written here) saved with save_pretrained, made once per module."""
    from social_reward.synthetic.pipelines import make_tiny_pipeline
    made = {}

    def make(family, t5=True):
        if (family, t5) not in made:
            made[family, t5] = make_tiny_pipeline(str(tmp_path_factory.mktemp(f"tiny-{family}")), family, t5=t5)
        return made[family, t5]
    return make
