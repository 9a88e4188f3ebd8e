"""Output folders that appear whole or not at all: written under a temporary name beside --out, then renamed into
place (export.py's model folders, best_of_n.py's image folders).

    check_new_folder(out, overwrite, keep=[checkpoint])
    with folder_written_whole(out) as tmp:
        ...write files into tmp...
"""
import contextlib
import os
import shutil

from social_reward.errors import InputError


def check_new_folder(out, overwrite=False, keep=()):
    """--out must be a new or empty folder, or --overwrite given; never one whose replacement would take away one of
    `keep` (an input file) or the current folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: a file, not a folder")
    folder = os.path.realpath(out)
    for path in [*keep, os.getcwd()]:
        if os.path.commonpath([folder, os.path.realpath(path)]) == folder:
            what = "the current folder" if path == os.getcwd() else path
            raise InputError(f"--out {out}: holds {what}, which writing it would replace; choose a new folder")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not overwrite:
        raise InputError(f"--out {out}: holds other files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                         f"pass --overwrite to replace them")


@contextlib.contextmanager
def folder_written_whole(out):
    """Yield a temporary folder beside `out`; when the block ends without error it replaces `out` whole (an old
    folder is swapped out, then removed), and on an error it is removed and `out` is left as it was."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.writing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.isdir(out) and os.listdir(out):
            os.replace(out, tmp + ".old")
            os.replace(tmp, out)
            shutil.rmtree(tmp + ".old")
        else:
            os.replace(tmp, out)  # onto a missing or empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_free_space(folder, nbytes, what):
    """Refuse to start writing `what` (about `nbytes`) into `folder` when its disk has less free space than that plus a
    margin (a tenth, and 16 MB for the file system's own blocks): one line naming the folder and the space needed,
    before anything is written, so that the previous checkpoint stays the newest whole one."""
    needed = int(nbytes * 1.1) + 16 * 2**20
    free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))).free
    if free < needed:
        raise InputError(f"{folder}: not enough free space to write {what}: it needs {needed / 2**20:.1f} MB, "
                         f"{free / 2**20:.1f} MB are free; nothing was written, the previous checkpoint is intact")
