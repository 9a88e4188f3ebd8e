"""What an install costs: the time `pip install` takes and the size on disk of a fresh virtual environment holding (a)
the core package alone and (b) everything requirements.txt names (the torch pins and `-e .[all]`).

    python benchmarks/install_size.py                  # about 10 minutes here, most of it the first install's downloads
    python benchmarks/install_size.py --json /tmp/install-size.json --skip_cold

Each install runs in a virtual environment of its own, made by `python3 -m venv` in a temporary folder (with the pip
that venv ships), from the repository's root (requirements.txt's `-e .` is relative to it); its size is `du` of the
whole folder (the interpreter's links, pip and setuptools included), then the folder is removed. pip's settings (its
index, extra indexes, find-links, constraints) are the machine's: wheels it finds on this machine's disk are counted as
local files (here torch, torchvision and most of their nvidia-* libraries), the rest as downloads. pip's cache is a
temporary folder of its own, empty at the start: a first, "cold" install of everything fills it (with the wheels pip
builds, pyspark's from its sdist, and the registry's responses where the registry lets pip keep them), then (a) and (b)
are timed with it, as a second install on a machine is; what the cache holds after each install is recorded. Prints a
markdown table; writes the numbers, with the commands, the machine, pip's version and the date, to --json.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # requirements.txt's
INSTALLS = {  # name: pip install's arguments
    "core": ["-e", ROOT, *PINS],
    "all": ["-r", os.path.join(ROOT, "requirements.txt")],
}


def du_bytes(path):
    """Disk usage of `path` in bytes, as `du` counts it (blocks allocated, each hard link once)."""
    return int(subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def largest(site_packages, count=8):
    """The `count` largest entries of site-packages: [(name, MiB)]."""
    sizes = [(name, du_bytes(os.path.join(site_packages, name)) / 2**20) for name in os.listdir(site_packages)]
    return sorted(sizes, key=lambda item: -item[1])[:count]


def install(name, python3, folder, env, log_folder):
    """A fresh venv under `folder`, INSTALLS[name] pip-installed into it: the numbers, then the venv removed."""
    venv = os.path.join(folder, f"venv-{name}")
    start = time.perf_counter()
    subprocess.run([python3, "-m", "venv", venv], check=True, env=env)
    venv_seconds = time.perf_counter() - start
    python = os.path.join(venv, "bin", "python")
    pip_version = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, env=env,
                                 check=True).stdout.split()[1]
    empty_bytes = du_bytes(venv)
    command = [python, "-m", "pip", "install", *INSTALLS[name]]
    log = os.path.join(log_folder, f"pip-{name}.log")
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    install_seconds = time.perf_counter() - start
    if result.returncode:
        with open(log) as f:
            raise SystemExit(f"{' '.join(command)} failed:\n{f.read()[-3000:]}")
    with open(log) as f:
        output = f.read()
    packages = json.loads(subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True,
                                         text=True, env=env, check=True).stdout)
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    result = {
        "command": " ".join(["pip", "install", *INSTALLS[name]]),
        "pip": pip_version, "venv_seconds": venv_seconds, "install_seconds": install_seconds,
        "size_bytes": du_bytes(venv), "empty_venv_bytes": empty_bytes, "packages": len(packages),
        "downloads": len(re.findall(r"^\s*Downloading ", output, re.M)),
        "from_cache": len(re.findall(r"^\s*Using cached ", output, re.M)),
        "local_files": len(re.findall(r"^\s*Processing /", output, re.M)),  # wheels on this machine's disk
        "torch": next((p["version"] for p in packages if p["name"] == "torch"), None),
        "largest_in_site_packages_mib": largest(site_packages)}
    shutil.rmtree(venv)
    return result


def cache_contents(cache):
    """{folder of pip's cache: bytes}: `wheels` (what pip built), `http`/`http-v2` (what it downloaded and kept)."""
    return {name: du_bytes(os.path.join(cache, name)) for name in sorted(os.listdir(cache))} if os.path.isdir(cache) \
        else {}


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python3", default=shutil.which("python3"), help="the interpreter that makes the venvs")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the venvs and pip's cache are made")
    parser.add_argument("--skip_cold", action="store_true",
                        help="no cold install first: (a) and (b) fill the empty cache themselves")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results-install-size.json"))
    args = parser.parse_args()
    version = subprocess.run([args.python3, "--version"], capture_output=True, text=True).stdout.split()[1]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"node": platform.node(), "nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu_model()},
              "command": ("python benchmarks/install_size.py " + " ".join(sys.argv[1:])).strip(),
              "python3": f"{args.python3} (Python {version})", "venv": "python3 -m venv DIR",
              "load_average_at_start": os.getloadavg(), "installs": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        cache = os.path.join(folder, "pip-cache")
        env = {**os.environ, "PIP_CACHE_DIR": cache}
        env.pop("VIRTUAL_ENV", None)
        order = ([] if args.skip_cold else [("cold_all", "all")]) + [("core", "core"), ("all", "all")]
        for label, name in order:
            before = cache_contents(cache)
            result = install(name, args.python3, folder, env, folder)
            result["pip_cache_bytes_before"], result["pip_cache_bytes_after"] = before, cache_contents(cache)
            report["installs"][label] = result
            print(f"{label}: {result['install_seconds']:.0f} s, {result['size_bytes'] / 2**30:.2f} GiB, "
                  f"{result['packages']} packages ({result['downloads']} downloaded, {result['from_cache']} from "
                  f"pip's cache, {result['local_files']} local files)", file=sys.stderr, flush=True)
    report["load_average_at_end"] = os.getloadavg()
    report["pip"] = next(iter(report["installs"].values()))["pip"]
    machine = report["machine"]
    print(f"{report['date']}, {machine['nproc']} CPUs ({machine['cpu_model']}), {report['python3']}, pip "
          f"{report['pip']} (the venv's own), load average {report['load_average_at_start'][0]:.2f} at start, "
          f"{report['load_average_at_end'][0]:.2f} at end: {report['command']}\n")
    print("| install | command (in a fresh `python3 -m venv`, from the repository's root) | pip's cache before | "
          "wheels: downloaded / local / pip's cache | pip install s | venv size on disk | packages | largest |\n"
          "|---|---|---|---|---|---|---|---|")
    for label, r in report["installs"].items():
        top = ", ".join(f"{name} {mib / 1024:.2f} GiB" if mib >= 1024 else f"{name} {mib:.0f} MiB"
                        for name, mib in r["largest_in_site_packages_mib"][:4])
        cache = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in r["pip_cache_bytes_before"].items()
                          if size >= 2**20) or "empty"
        print(f"| {label} | `{r['command']}` | {cache} | {r['downloads']} / {r['local_files']} / {r['from_cache']} | "
              f"{r['install_seconds']:.0f} | {r['size_bytes'] / 2**30:.2f} GiB | {r['packages']} | {top} |")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
