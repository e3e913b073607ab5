"""Experiment tracking as TRL's `report_to`: --report-to tensorboard|wandb also sends every line of a stage's
metrics.jsonl (the same scalars, at its "step") and the resolved arguments (the run's config) to that tracker.

- tensorboard: event files in OUTPUT/tensorboard (torch.utils.tensorboard, `pip install tensorboard`), offline.
  `tensorboard --logdir RUN` shows each stage of an iterate.py run as a run named by its folder (sft/tensorboard,
  iter1/policy/tensorboard, ...); the arguments are the text summary "args".
- wandb: one wandb run per stage, in OUTPUT/wandb, project $WANDB_PROJECT (default "minirlhf"), named by the
  stage's folder within the iterate.py run (iter1/policy) and grouped under that run's folder name. wandb reads
  its own settings: WANDB_MODE=offline keeps everything on disk (`wandb sync` later).
Rank 0 reports; the tracker is imported only when asked for. rundir.start starts a tracker and Run.log / close
feed and end it, so the scripts only declare the flag. Not in TRL: nothing is reported but metrics.jsonl.
"""
import json
import os
import shutil

from minirlhf.rundir import UserError

CHOICES = ["none", "tensorboard", "wandb"]
GROUPS = []  # folders of the iterate.py runs in progress in this process (their stages are started inside them)


class Tracker:
    """One stage's run in TensorBoard or wandb; for an iterate.py run (`group`), only the name its stages'
    runs are grouped under (iterate.py logs no metrics.jsonl of its own). `resume`: continue the event files."""

    def __init__(self, report_to, out, config, resume=False, group=False):
        self.report_to, self.writer, self.group = report_to, None, os.path.abspath(out) if group else None
        if group:
            GROUPS.append(self.group)
            return
        root = GROUPS[-1] if GROUPS else os.path.dirname(os.path.abspath(out))
        name = os.path.relpath(os.path.abspath(out), root)
        try:
            if report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                log_dir = os.path.join(out, "tensorboard")
                if not resume:  # a new run: the last run's curves would be drawn over this one's
                    shutil.rmtree(log_dir, ignore_errors=True)
                self.writer = SummaryWriter(log_dir)
                self.writer.add_text("args", "```\n" + json.dumps(config, indent=2) + "\n```")
            else:
                import wandb
                os.makedirs(os.path.join(out, "wandb"), exist_ok=True)
                self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "minirlhf"), name=name,
                                         group=os.path.basename(GROUPS[-1]) if GROUPS else None, config=config,
                                         dir=out)
        except ImportError as e:
            raise UserError(f"--report-to {report_to} needs the {report_to} package ({e}): pip install "
                            f"{report_to}, or run with --report-to none") from None

    def log(self, metrics):
        """One metrics.jsonl line: every number in it at its step."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.report_to == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, metrics["step"])
        elif self.writer is not None:
            self.writer.log(scalars, step=metrics["step"])

    def close(self):
        if self.group:
            GROUPS.remove(self.group)
        elif self.report_to == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


def start(report_to, out, config, resume=False, group=False):
    """-> a Tracker, or None for "none" (or no --report-to flag at all)."""
    return None if report_to in (None, "none") else Tracker(report_to, out, config, resume, group)
