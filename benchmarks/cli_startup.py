"""How fast every command answers before it does any work: the wall time and the peak RSS of the whole process of
`python COMMAND --help`, and of one flag mistake (an unknown flag, which must end in argparse's usage error, exit
status 2), for the original's commands at the root (train_pair_pos_neg.py, validate.py, demo.py) and every
scripts/*.py; with --before, the same commands in an old checkout, by the same interpreter, side by side.

    python benchmarks/cli_startup.py                                  # this checkout, 5 runs a measurement
    python benchmarks/cli_startup.py --before /tmp/oldtree --runs 5   # and an old checkout (commands at its root)

A command that takes arguments gets its required ones as dummy values (read off argparse's own "required" message), so
that the mistake argparse reports is the unknown flag itself. Each process is started from the tree's root under
/usr/bin/time, which reports the child's ru_maxrss from wait4 (getrusage of the child): its peak RSS. Not read here with
os.wait4, because Linux keeps the high-water mark of the memory a process replaces at exec, so a child started by this
Python process (posix_spawn and vfork share its memory until exec) would never read below this process's own peak; GNU
time is a small C program that forks. The wall time is this process's clock around it (GNU time's own start included:
about a millisecond). Bytecode: each run's modules are compiled once into a temporary PYTHONPYCACHEPREFIX (an untimed
first round warms it; neither tree is written to), as a user's __pycache__ folders would hold them. The rounds
interleave the commands and the trees, so a change in the machine's load falls on both. Prints two markdown tables;
writes the numbers to --json.
"""
import argparse
import glob
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_COMMANDS = ["train_pair_pos_neg.py", "validate.py", "demo.py"]  # the original's, still at the root
MISTAKE = "--no_such_flag"
TIME = "/usr/bin/time"  # GNU time
CASES = {"help": "--help", "mistake": MISTAKE}


def commands():
    """The commands, as paths relative to a checkout's root: the root ones, then scripts/*.py."""
    return ROOT_COMMANDS + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.py")))


def locate(tree, command):
    """`command`'s file in `tree`: at the same path, else at the tree's root (the layout before scripts/)."""
    for path in (os.path.join(tree, command), os.path.join(tree, os.path.basename(command))):
        if os.path.isfile(path):
            return path
    return None


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def run(argv, cwd, env, timeout=120):
    """`argv` as a child process started in `cwd`: (exit status, stdout, stderr, wall seconds, peak RSS in MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        actions = [(os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)]
        timed = [TIME, "--format", "%M", "--output", rss.name, *argv]
        here = os.getcwd()
        os.chdir(cwd)  # posix_spawn has no cwd; this process is single-threaded
        try:
            start = time.perf_counter()
            pid = os.posix_spawn(TIME, timed, env, file_actions=actions, setsid=True)  # a group to kill
        finally:
            os.chdir(here)
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
        try:
            _, status = os.waitpid(pid, 0)
            seconds = time.perf_counter() - start
        except Timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise SystemExit(f"{' '.join(argv)}: still running after {timeout} s")
        finally:
            signal.alarm(0)
        out.seek(0)
        err.seek(0)
        peak_kib = int(rss.read().split()[-1])  # the last line; a line before it says so if a signal ended the child
        return (os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), seconds, peak_kib / 1024)


def error_line(stderr):
    """argparse's message: the last line of stderr that says `error:`."""
    return next((line for line in reversed(stderr.splitlines()) if "error:" in line), stderr.strip()[-200:])


def mistake_argv(python, path, cwd, env):
    """The arguments that make `MISTAKE` the only thing wrong: the command's required arguments with dummy values
    (an invalid choice replaced by the first valid one), then MISTAKE."""
    positionals, options = [], []
    for _ in range(10):
        argv = [python, path, *positionals, *options, MISTAKE]
        code, _, stderr, _, _ = run(argv, cwd, env)
        message = error_line(stderr)
        if code != 2 or "usage:" not in stderr:
            raise SystemExit(f"{' '.join(argv)}: exit status {code}, not argparse's usage error:\n{stderr[-2000:]}")
        if f"unrecognized arguments: {MISTAKE}" in message:
            return argv
        required = re.search(r"the following arguments are required: (.*)", message)
        choice = re.search(r"argument (\S+): invalid choice: '[^']*' \(choose from '?([^',)]+)", message)
        if required:
            for name in required.group(1).split(", "):
                name = name.split("/")[0]
                if name.startswith("-"):
                    options += [name, "x"]
                else:
                    positionals.append("x")
        elif choice and choice.group(1).split("/")[0] in options:
            options[options.index(choice.group(1).split("/")[0]) + 1] = choice.group(2)
        else:
            break
    return argv  # argparse's usage error all the same, for another reason than the flag (its message is kept)


def summary(values):
    return {"min": min(values), "median": statistics.median(values)}


def measure(trees, runs, python, env):
    """{command: {tree: {case: result}}} over `runs` interleaved rounds after one untimed round."""
    plan, results = [], {}
    for command in commands():
        results[command] = {}
        for tree_name, tree in trees.items():
            path = locate(tree, command)
            if path is None:
                results[command][tree_name] = None
                continue
            results[command][tree_name] = {}
            for case, flag in CASES.items():
                argv = mistake_argv(python, path, tree, env) if case == "mistake" else [python, path, flag]
                entry = {"command": " ".join(["python", os.path.relpath(path, tree), *argv[2:]]), "seconds": [],
                         "peak_rss_mib": []}
                results[command][tree_name][case] = entry
                plan.append((argv, tree, entry, case))
    for round_index in range(runs + 1):  # round 0 warms the bytecode cache and the page cache; it is not kept
        for argv, tree, entry, case in plan:
            code, stdout, stderr, seconds, peak = run(argv, tree, env)
            expected = 0 if case == "help" else 2
            if code != expected or "usage:" not in (stdout if case == "help" else stderr):
                raise SystemExit(f"{entry['command']} (in {tree}): exit status {code}, expected {expected}:\n"
                                 f"{stderr[-2000:]}")
            if round_index:
                entry["seconds"].append(seconds)
                entry["peak_rss_mib"].append(peak)
            entry["exit_status"] = code
            if case == "mistake":
                entry["message"] = error_line(stderr)
        print(f"round {round_index}/{runs} done", file=sys.stderr, flush=True)
    for by_tree in results.values():
        for by_case in by_tree.values():
            for entry in (by_case or {}).values():
                entry["seconds_summary"] = summary(entry["seconds"])
                entry["peak_rss_mib_summary"] = summary(entry["peak_rss_mib"])
    return results


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def cell(entry, key):
    if entry is None:
        return "(absent)"
    s = entry[key + "_summary"]
    return f"{s['min']:.2f} / {s['median']:.2f}" if key == "seconds" else f"{s['min']:.0f} / {s['median']:.0f}"


def markdown(results, before):
    """A table per case: each command's seconds and peak RSS (min / median), and the old checkout's beside them."""
    tables = []
    for case in CASES:
        title = ("`python COMMAND --help`:" if case == "help" else f"One flag mistake, `python COMMAND [its required "
                 f"arguments, dummy values] {MISTAKE}`: argparse's usage error, exit status 2:")
        header = "| command | s (min / median) | peak RSS MiB (min / median) |"
        rule = "|---|---|---|"
        if before:
            header += " before: s (min / median) | before: peak RSS MiB (min / median) | median s before / now |"
            rule += "---|---|---|"
        lines = [title, "", header, rule]
        for command, by_tree in results.items():
            now = (by_tree["now"] or {}).get(case)
            row = f"| {command} | {cell(now, 'seconds')} | {cell(now, 'peak_rss_mib')} |"
            if before:
                old = (by_tree.get("before") or {}).get(case)
                ratio = (f"{old['seconds_summary']['median'] / now['seconds_summary']['median']:.1f}x"
                         if old and now else "")
                row += f" {cell(old, 'seconds')} | {cell(old, 'peak_rss_mib')} | {ratio} |"
            lines.append(row)
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def heading(report):
    alone, machine = report["interpreter_alone"], report["machine"]
    return (f"{report['date']}, {machine['nproc']} CPUs ({machine['cpu_model']}), Python {report['python_version']}, "
            f"load average {report['load_average_at_start'][0]:.2f} at start, {report['load_average_at_end'][0]:.2f} "
            f"at end: {report['command']}\n{report['runs']} runs each (min / median); the interpreter alone (python -c "
            f"pass): {alone['seconds']['median']:.3f} s, {alone['peak_rss_mib']['median']:.0f} MiB (medians)\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each measurement (min and median kept)")
    parser.add_argument("--before", default=None, metavar="DIR", help="an old checkout to measure side by side")
    parser.add_argument("--python", default=sys.executable, help="the interpreter (the same for both checkouts)")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results-cli-startup.json"))
    parser.add_argument("--table", default=None, metavar="JSON", help="only print the tables of a results file")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            report = json.load(f)
        print(heading(report))
        return print(markdown(report["results"], "before" in report["trees"]))
    trees = {"now": ROOT, **({"before": os.path.abspath(args.before)} if args.before else {})}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as pycache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        interpreter = [run([args.python, "-c", "pass"], ROOT, env) for _ in range(args.runs + 1)][1:]
        results = measure(trees, args.runs, args.python, env)
    load_at_end = os.getloadavg()
    version = run([args.python, "-c", "import sys; print(sys.version.split()[0])"], ROOT, os.environ)[1].strip()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"node": platform.node(), "nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu_model()},
        "command": ("python benchmarks/cli_startup.py " + " ".join(sys.argv[1:])).strip(),
        "python": args.python, "python_version": version, "trees": trees, "runs": args.runs,
        "load_average_at_start": load_at_start, "load_average_at_end": load_at_end,
        "bytecode": "compiled into a temporary PYTHONPYCACHEPREFIX, warmed by an untimed first round",
        "interpreter_alone": {"command": "python -c pass", "seconds": summary([r[3] for r in interpreter]),
                              "peak_rss_mib": summary([r[4] for r in interpreter])},
        "results": results}
    print(heading(report))
    print(markdown(results, args.before))
    slow = [command for command, by_tree in results.items()
            if by_tree["now"] and by_tree["now"]["help"]["seconds_summary"]["median"] >= 1.0]
    if slow:
        print(f"\nover a second for --help: {', '.join(slow)} (python -X importtime COMMAND --help says which import)")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
