"""What both trainers (train_pair_pos_neg.py, scripts/finetune_generator.py) log about a run: metrics.csv, a row per
optimizer step, and the same to accelerate's trackers (--report_to).

    metrics = MetricsLog(accelerator, save_folder, ("step", "loss"), resumed_step=None, project="social_reward")
    metrics.log(step=1, loss=0.25)
"""
import csv
import os

import pandas as pd


class MetricsLog:
    """metrics.csv with `columns` (a missing value is left empty), written by the main process; a resumed run drops
    the rows after the step it resumes from (those a killed run did not save). Trackers (--report_to) start with
    `tracker_config` when given."""

    def __init__(self, accelerator, save_folder, columns, resumed_step=None, project="social_reward",
                 tracker_config=None):
        self.accelerator, self.columns = accelerator, columns
        self.path = os.path.join(save_folder, "metrics.csv")
        if tracker_config:
            accelerator.init_trackers(project, config=tracker_config)
        if accelerator.is_main_process:
            if resumed_step is not None and os.path.exists(self.path):
                rows = pd.read_csv(self.path)
                # a run saved by an older version may lack some of today's columns: the file gets them, empty
                self.columns = list(columns) + [c for c in rows.columns if c not in columns]
                rows[rows.step <= resumed_step].reindex(columns=self.columns).to_csv(self.path, index=False)
            else:
                with open(self.path, "w", newline="") as f:
                    csv.writer(f).writerow(columns)

    def log(self, **row):
        self.accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])
        if self.accelerator.is_main_process:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow(["" if row.get(k) is None else row[k] for k in self.columns])
