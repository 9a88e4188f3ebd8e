"""What this machine lets DuckDB use: the CPUs this process may run on (affinity and the cgroup's CPU quota, v2 or
v1) and a memory limit of 512 MB a thread, at most a quarter of the RAM or of the cgroup's limit.

    DuckDBEngine(memory_limit=machine_memory_limit(machine_threads()), threads=machine_threads())
"""
import os

MEMORY_PER_THREAD = 512 * 2 ** 20  # DuckDB's default memory limit here: this much a thread, at most a quarter of RAM


CGROUP = "/sys/fs/cgroup"  # where this process's cgroup limits are mounted (v2: cpu.max, memory.max; v1: cpu/, memory/)


def cgroup_value(*names):
    """The first of the cgroup files `names` (under CGROUP) that can be read, its words; None when none can."""
    for name in names:
        try:
            with open(os.path.join(CGROUP, name)) as f:
                return f.read().split()
        except OSError:
            continue
    return None


def machine_threads():
    """The cores this process may run on (its CPU affinity and its cgroup's quota, v2 or v1), not the host's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup_value("cpu.max") or (cgroup_value("cpu/cpu.cfs_quota_us") or ["-1"])[:1] + (
            cgroup_value("cpu/cpu.cfs_period_us") or ["100000"])[:1]  # v2's "QUOTA PERIOD", else v1's two files
        if quota not in ("max", "-1"):
            cores = min(cores, max(1, int(quota) // int(period)))
    except ValueError:
        pass
    return cores


def machine_memory_limit(threads):
    """DuckDB's memory limit when --memory_limit is not given: MEMORY_PER_THREAD a thread, at most a quarter of the
    memory this process may use (RAM, or its cgroup's limit, v2 or v1). DuckDB's own default, 80% of RAM, let a run of
    2M candidate pairs at 20M events reach 2.3 GB on a 2-core machine, where 1 GB spills and writes the same pairs."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the per-thread share alone
        memory = 4 * MEMORY_PER_THREAD * threads
    limit = cgroup_value("memory.max", "memory/memory.limit_in_bytes")
    if limit and limit[0].isdigit():  # "max" (v2), or v1's page-rounded 2^63 when unlimited: larger than RAM
        memory = min(memory, int(limit[0]))
    return f"{min(MEMORY_PER_THREAD * threads, memory // 4) // 2 ** 20}MB"
