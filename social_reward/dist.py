"""Several processes as one run: whether this process is one of several (accelerate launch, torchrun), which one
writes, the barrier, a share of the work each, a check decided by all of them, and the refusal of a launch whose
processes each believe they are alone.

    state = distributed()                          # accelerate's PartialState under several processes, else None
    device = process_device(args.device)           # under several GPU processes: this process's GPU
    scores = across_processes(encode, items)       # each process encodes a share; every one gets the whole tensor
    if is_main_process():
        write(scores)
    decided_together(check_free_space, folder, nbytes, what)    # a failure on any process stops every process

A launcher that starts N processes which accelerate then runs each alone (an FSDP config with use_cpu: accelerate
sets FSDP up on GPUs only) would have N copies read all the data and write the same files: check_not_alone refuses it
in one line, before anything is read or written (make_accelerator and distributed() call it).
"""
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, get_int_from_env, parse_flag_from_env

from social_reward.errors import InputError, described

# where a launcher says how many processes it started: torchrun and accelerate launch (WORLD_SIZE), MPI's launchers
LAUNCHED = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes():
    """How many processes the launcher started for this run (1 when none did)."""
    return get_int_from_env(LAUNCHED, 1)


def check_not_alone(num_processes):
    """Refuse, in one line, a process that the launcher started as one of several but that accelerate runs alone
    (`num_processes` 1): each copy would read all the data and write the same outputs."""
    launched = launched_processes()
    if launched > 1 and num_processes != launched:
        raise InputError(f"this process is one of {launched} that the launcher started, but accelerate runs it as one "
                         f"of {num_processes} (no process group: each would read everything and write the same "
                         f"files); launch a distributed run: `accelerate launch --multi_gpu` on GPUs, or on CPUs "
                         f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} SCRIPT ...` (docs/distributed.md)")


def check_one_process(command):
    """Refuse, in one line, a launch of several processes for a command that works on one process only: each would
    write the same outputs."""
    launched = launched_processes()
    if launched > 1:
        raise InputError(f"{command} runs on one process; a launch of {launched} would write every output {launched} "
                         f"times: run it once per device instead (each with its own outputs)")


def make_accelerator(**kwargs):
    """accelerate's Accelerator(**kwargs), refused (check_not_alone) when the launch is not one distributed run: what
    both trainers start with, before they read or write anything."""
    from accelerate import Accelerator
    accelerator = Accelerator(**kwargs)
    check_not_alone(accelerator.num_processes)
    return accelerator


def decided_together(check, *args):
    """check(*args) on every process, the processes agreeing on the outcome: a check that fails on some processes only
    (a node-local disk) stops them all, instead of leaving the others waiting at the next barrier. Every process
    raises the first failure as one InputError line naming its process; a process whose own error was not an
    InputError (a bug, say) raises that error itself, traceback and all. With one process, check(*args)."""
    state = PartialState() if launched_processes() > 1 else None
    if state is None or state.num_processes == 1:
        return check(*args)
    error = None
    try:
        check(*args)
    except Exception as e:  # any error (a folder missing on one node too): the others must not wait for this one
        error = e
    failed = None if error is None else \
        f"process {state.process_index}: {error if isinstance(error, InputError) else described(error)}"
    failures = [message for message in gather_object([failed]) if message]
    if error is not None and not isinstance(error, InputError):
        raise error
    if failures:
        raise InputError(failures[0])


def distributed():
    """accelerate's PartialState when this process is one of several (accelerate launch, torchrun), else None. The
    first call creates the process group (gloo on CPUs, nccl on GPUs, each process bound to its own GPU); a single
    process creates none."""
    if launched_processes() <= 1:
        return None
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_not_alone(state.num_processes)
    return state


def is_main_process():
    """Whether this process writes outputs and prints: the only one, or the main one of several."""
    state = distributed()
    return state is None or state.is_main_process


def wait_for_everyone():
    """A barrier across the processes (nothing with one process)."""
    state = distributed()
    if state is not None:
        state.wait_for_everyone()


def process_device(device):
    """The device this process encodes on: `device`, except that under several processes "cuda" is this process's
    own GPU. Call before the model is loaded onto it."""
    state = distributed()
    if state is not None and torch.device(device).type == "cuda" and torch.device(device).index is None:
        return str(state.device)
    return device


def across_processes(encode, items):
    """encode(items) (a tensor with a row per item), with the items split across the processes: each encodes a
    contiguous share, and every process returns the whole tensor, in order. One process: encode(items)."""
    state = distributed()
    if state is None:
        return encode(items)
    bounds = [len(items) * i // state.num_processes for i in range(state.num_processes + 1)]
    mine = encode(items[bounds[state.process_index]:bounds[state.process_index + 1]])
    parts = [None] * state.num_processes
    torch.distributed.all_gather_object(parts, mine)
    parts = [part for part in parts if len(part)]
    return torch.cat(parts) if parts else mine
