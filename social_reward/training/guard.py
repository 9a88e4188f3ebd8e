"""The check after each forward pass, the same in both trainers: a non-finite loss (or reward) on any process stops
the run in one line naming the step and its culprit, or, with --skip_nonfinite_loss, drops the whole accumulation
window it falls in: no micro-batch of that window reaches the optimizer, so the weights are those of a run that never
saw it.

    guard = NonFiniteGuard(accelerator, save_folder, skip_nonfinite_loss)
    with accelerator.accumulate(model):
        loss = ...
        if guard.finite(accelerator.gather(loss.detach()[None]), f"step {step}", lambda: f"... rows {rows}"):
            accelerator.backward(loss)
    if accelerator.sync_gradients:
        if guard.end_window():
            optimizer.step()
        optimizer.zero_grad()
"""
import torch

from social_reward.errors import InputError


class NonFiniteGuard:
    def __init__(self, accelerator, save_folder, skip_nonfinite_loss):
        self.accelerator, self.save_folder, self.skip = accelerator, save_folder, skip_nonfinite_loss
        self.window_ok = True

    def finite(self, values, where, cause):
        """Whether every process's `values` (gathered) are finite. If not: without skip_nonfinite_loss, InputError
        "WHERE: CAUSE; ..." (where: "step 3", the step's number); with it, the cause is printed and the current
        accumulation window is dropped. `cause()` names the culprit (it may gather: every process calls it)."""
        if torch.isfinite(values).all():
            return True
        cause = cause()
        if not self.skip:
            raise InputError(f"{where}: {cause}; the last checkpoint in {self.save_folder} is intact "
                             f"(--skip_nonfinite_loss skips such steps)")
        self.accelerator.print(f"skipped a step: {cause}")
        self.window_ok = False
        return False

    def end_window(self):
        """At the end of an accumulation window (accelerator.sync_gradients): whether its optimizer step may be
        taken (False when a micro-batch of it was not finite); the next window starts clean."""
        ok, self.window_ok = self.window_ok, True
        return ok
