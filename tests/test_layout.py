"""The repository's shape, held by tools: the import-linter contract (the library's layers; the library never
imports a command), the root holding the original's files and demo.py only, every command answering --help and a
flag mistake without importing a model library, and a missing extra named in one line."""
import json
import os
import subprocess
import sys

from conftest import ROOT

COMMANDS = ["train_pair_pos_neg.py", "validate.py", "demo.py"] + sorted(
    os.path.join("scripts", f) for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py"))
HEAVY = ("torch", "torchvision", "open_clip", "pandas", "pyarrow", "transformers", "diffusers", "duckdb", "accelerate")

# run in a fresh interpreter where importing any heavy library fails: each command's --help and one flag mistake
HELP_WITHOUT_HEAVY = """
import contextlib, io, json, runpy, sys
for name in {heavy!r}:
    sys.modules[name] = None  # importing it now raises ModuleNotFoundError
results = {{}}
for command in {commands!r}:
    for args in (["--help"], ["--no_such_flag"]):
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [command, *args]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_path(command, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code, err = repr(e), io.StringIO(repr(e))
        results[f"{{command}} {{args[0]}}"] = [code, out.getvalue()[:200], err.getvalue()[-300:]]
print(json.dumps(results))
"""


def test_the_import_linter_contract_holds():
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lint-imports")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_the_root_holds_the_originals_four_files_and_the_demo_only():
    assert sorted(f for f in os.listdir(ROOT) if f.endswith(".py")) == [
        "data_set.py", "demo.py", "losses.py", "train_pair_pos_neg.py", "validate.py"]


def test_every_command_answers_help_and_a_flag_mistake_without_importing_a_model_library():
    code = HELP_WITHOUT_HEAVY.format(heavy=HEAVY, commands=COMMANDS)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for command in COMMANDS:
        code, out, _ = results[f"{command} --help"]
        assert code == 0 and out.startswith("usage:"), (command, results[f"{command} --help"])
        code, _, err = results[f"{command} --no_such_flag"]
        assert code == 2 and ": error: " in err, (command, err)  # argparse's usage line and error, at once


def test_a_missing_extra_is_named_in_one_line():
    code = ("import runpy, sys; sys.modules['duckdb'] = None; "
            "sys.argv = ['scripts/social_pairs.py', 'posts.parquet', '--out', 'never']; "
            "runpy.run_path('scripts/social_pairs.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: duckdb is not installed: this needs the mine extra: pip install -e '.[mine]' (requirements.txt "
        "installs every extra)"]
