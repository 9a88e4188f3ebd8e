"""Where both trainers keep a run's state: accelerate's state folders (optimizer, RNG, our position in
progress.json), each written whole or not at all after a free-space check every process agrees on, found again for
--resume_from_checkpoint (a path, or "latest"), and rotated (the newest kept).

    save_state_whole(accelerator, os.path.join(save_folder, "checkpoint-100"), {"step": 100}, nbytes)
    folder = find_state(resume_from_checkpoint, save_folder, "checkpoint-", "checkpoint-STEP folder")
    rotate(accelerator, os.path.join(save_folder, "checkpoint-100"), "checkpoint-", keep=3)
"""
import glob
import json
import os
import shutil

from safetensors.torch import save_file

from social_reward.dist import decided_together
from social_reward.errors import InputError
from social_reward.outputs import check_free_space


def save_state_whole(accelerator, folder, progress, nbytes, tensors=None):
    """accelerator.save_state plus progress.json (our position in the run) into `folder`, and `tensors` ({file name:
    {key: tensor}}, written as safetensors: read back without unpickling anything), written under a temporary name
    and renamed when whole, so a run killed while saving leaves the previous state as it was. A disk without room for
    about `nbytes` on any process stops every process before anything is written."""
    free_space(os.path.dirname(folder), nbytes, os.path.basename(folder))
    tmp = folder + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process's RNG state is in tmp before it is renamed
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump(progress, f)
        for name, named in (tensors or {}).items():
            save_file({key: value.detach().contiguous().cpu() for key, value in named.items()},
                      os.path.join(tmp, name))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def free_space(folder, nbytes, what):
    """outputs.check_free_space on every process, decided together: a node-local disk short of room on one process
    stops them all in one line (dist.decided_together), before anything is written."""
    decided_together(check_free_space, folder, nbytes, what)


def state_folders(save_folder, prefix):
    """The whole PREFIX<N> folders in save_folder, oldest (smallest N) first."""
    found = [p for p in glob.glob(os.path.join(save_folder, f"{prefix}*")) if not p.endswith(".tmp")]
    return sorted(found, key=lambda p: int(os.path.basename(p)[len(prefix):]))


def find_state(resume_from_checkpoint, save_folder, prefix, described):
    """The state folder to resume from: the path given (a folder with progress.json), or for "latest" the newest
    whole one in save_folder; `described` names such a folder in the refusal."""
    if resume_from_checkpoint == "latest":
        found = state_folders(save_folder, prefix)
        if not found:
            raise InputError(f"--resume_from_checkpoint latest: no {described} in {save_folder}")
        return found[-1]
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "progress.json")):
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: not a checkpoint of this script (a "
                         f"{described} with progress.json)")
    return resume_from_checkpoint


def rotate(accelerator, written, prefix, keep):
    """Keep `written` (the PREFIX<N> folder just written) and the `keep` - 1 others of its folder written last; delete
    the rest (nothing when keep is None). Ordered by when they were written, not by N: an earlier run into the same
    folder may have left higher-numbered ones, which go first."""
    if accelerator.is_main_process and keep:
        others = [p for p in state_folders(os.path.dirname(written), prefix)
                  if os.path.basename(p) != os.path.basename(written)]
        others.sort(key=os.path.getmtime)
        for old in others[:max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
