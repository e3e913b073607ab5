"""Experiment tracking as TRL's `report_to`: --report-to tensorboard|wandb also sends every line of a stage's
metrics.jsonl (at its "step") and the resolved arguments to that tracker. Rank 0 reports; rundir.start starts it.
- tensorboard: events in OUTPUT/tensorboard, a run per stage (of an iterate.py run: named by its folder), the
  arguments as the text summary "args". A resumed stage's events replace the killed run's from its first step.
- wandb: one run per stage in OUTPUT/wandb, project $WANDB_PROJECT (default "minirlhf"), named by its folder in
  the iterate.py run and grouped under it (WANDB_MODE=offline: on disk); a resumed stage is a new run.
The package is imported only when asked for; a missing one stops the run before any work.
"""
import importlib
import json
import os
import shutil

from minirlhf.rundir import UserError

GROUPS = []  # folders of the iterate.py runs in progress in this process (their stages are started inside them)


class Tracker:
    """One stage's run in TensorBoard or wandb; for an iterate.py run (`group`), the name its stages are grouped by."""
    def __init__(self, report_to, out, config, resume=False, group=False):
        self.report_to, self.out, self.config, self.writer = report_to, out, config, None
        self.group = os.path.abspath(out) if group else None
        try:  # before any work, also for iterate.py's run, whose stages come later
            self.module = importlib.import_module("torch.utils.tensorboard" if report_to == "tensorboard" else "wandb")
        except ImportError as e:
            raise UserError(f"--report-to {report_to} needs the {report_to} package ({e}): pip install "
                            f"{report_to}, or run with --report-to none") from None
        if group:
            GROUPS.append(self.group)
        elif report_to == "tensorboard" and not resume:  # a new run: the last run's curves would stay drawn
            shutil.rmtree(os.path.join(out, "tensorboard"), ignore_errors=True)
        elif report_to == "wandb":
            root = GROUPS[-1] if GROUPS else os.path.dirname(os.path.abspath(out))
            os.makedirs(os.path.join(out, "wandb"), exist_ok=True)
            self.writer = self.module.init(project=os.environ.get("WANDB_PROJECT", "minirlhf"), config=config,
                                           name=os.path.relpath(os.path.abspath(out), root), dir=out,
                                           group=os.path.basename(GROUPS[-1]) if GROUPS else None)

    def log(self, metrics):
        """One metrics.jsonl line: every number in it at its step."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.report_to == "wandb":
            return self.writer.log(scalars, step=metrics["step"])
        if self.writer is None:  # purge_step: a resumed run's first step drops the killed run's later events
            self.writer = self.module.SummaryWriter(os.path.join(self.out, "tensorboard"), purge_step=metrics["step"])
            self.writer.add_text("args", "```\n" + json.dumps(self.config, indent=2) + "\n```", metrics["step"])
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, metrics["step"])

    def close(self):
        if self.group:
            GROUPS.remove(self.group)
        elif self.writer is not None:  # SummaryWriter.close, wandb's Run.finish
            getattr(self.writer, "close" if self.report_to == "tensorboard" else "finish")()


def start(report_to, out, config, resume=False, group=False):
    """-> a Tracker, or None for "none" (or no --report-to flag at all)."""
    return None if report_to in (None, "none") else Tracker(report_to, out, config, resume, group)
