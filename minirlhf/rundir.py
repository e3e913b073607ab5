"""Output folders that say what they hold: a lock, a manifest, a staging folder, one publish step, done.json.

- OUTPUT/.lock (flock, held while the run lives) says "pid P on host H", the line a second run is refused with;
  the kernel drops the lock when its process dies, so a killed run never blocks the next.
- OUTPUT/manifest.json lists every top-level name this program wrote: a run replaces or deletes only those, and
  refuses a folder holding anything else before any work unless --overwrite.
- OUTPUT/staging/ (train_rm.py, train_dpo.py) holds the run in progress; `publish` moves it all into OUTPUT,
  done.json last, so until then OUTPUT holds the previous run whole. checkpoint/ (--resume) sits beside it.
- --resume (and iterate.py's reruns) refuse changed arguments that can change results (not --save-steps...).
Every write is atomic (a unique temporary renamed into place) and durable (fsyncs around the rename).
"""
import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass

from safetensors import SafetensorError

from minirlhf import dist

LOCK, MANIFEST, STAGING, DONE = ".lock", "manifest.json", "staging", "done.json"


class UserError(ValueError):
    """A mistake in the command line, the data or a folder: the message names what is wrong and what to do."""


@contextlib.contextmanager
def user_errors():
    """Around a script's main(): a UserError ends the process with its message and status 1, no traceback."""
    try:
        yield
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


def positive_int(text):
    """argparse type of counts that must be >= 1 (a batch size of 0 would divide by zero later)."""
    if (value := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src, dst):
    """os.replace after fsyncing src (file or tree), then dst's folder: after a power cut dst is old or new, whole."""
    if os.path.isdir(src):
        for root, _, files in os.walk(src, topdown=False):
            for name in files:
                _fsync(os.path.join(root, name))
            _fsync(root)
    else:
        _fsync(src)
    os.replace(src, dst)
    _fsync(os.path.dirname(os.path.abspath(dst)))


@contextlib.contextmanager
def writing(path):
    """Turn a failed write (disk full, no permission) into a UserError naming the path."""
    try:
        yield
    except (OSError, SafetensorError) as e:  # safetensors reports its own write errors with its own type
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"{path}: could not write: {reason}; free space or choose another --output-dir") from None


def atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with writing(path), open(tmp, "w") as f:
            f.write(text)
        durable_replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_json(path, obj):
    # allow_nan=False: NaN and Infinity are not JSON; a non-finite value is a bug to stop on, not to write
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path, default=None):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return default


def lock(out):
    """Hold OUTPUT/.lock (flock) -> the open file; refuse a folder that another live process holds."""
    path = os.path.join(out, LOCK)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out} is in use by {holder} (lock file {path}): wait for that run to end, or choose "
                        "another --output-dir") from None
    f.seek(0)
    if stale := f.read().strip():
        dist.print0(f"note: {path} was left by {stale}, which ended without releasing it (killed?); taking it over")
    f.truncate(0)  # "a+": the write below goes to the (new) end
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    return f


def unlock(f):
    """Empty the lock file and release it; it stays (deleted, a process that opened it just before locks no name)."""
    f.truncate(0)
    f.flush()
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def manifest(out):
    return read_json(os.path.join(out, MANIFEST), {"files": [], "published": []})


def claim(out, names, published=None):
    """Add `names` to the manifest (before writing them, so a kill never leaves a file of ours unlisted)."""
    m = manifest(out)
    m["files"] = sorted(set(m["files"]) | set(names) | set(published or []))
    if published is not None:
        m["published"] = sorted(published)
    atomic_write_json(os.path.join(out, MANIFEST), m)


def foreign_files(out):
    """Top-level names in `out` neither in the manifest nor a killed write's leftover (NAME.tmp-x, .NAME.tmp/.old)."""
    ours = set(manifest(out)["files"]) | {LOCK, MANIFEST}
    temp = re.compile(r"\.?(.+?)(\.tmp-[0-9a-f]+|\.tmp|\.old)")
    return [n for n in sorted(os.listdir(out)) if n not in ours and not
            ((m := temp.fullmatch(n)) and (m.group(1) in ours or m.group(1).lstrip(".") in ours))]


def changed_args(recorded, new, ignore=()):
    """['--flag: recorded R, now N', ...] for every argument that differs, except those in `ignore`."""
    new = json.loads(json.dumps(new))  # tuples -> lists, as recorded
    return [f"--{k.replace('_', '-')}: recorded {recorded.get(k)!r}, now {new.get(k)!r}"
            for k in sorted(set(recorded) | set(new)) if k not in ignore and recorded.get(k) != new.get(k)]


def check_args(recorded_path, args, ignore, allow_flag):
    if os.path.exists(recorded_path) and (differences := changed_args(read_json(recorded_path), args, ignore)):
        raise UserError(f"{recorded_path} records other values of arguments that change results:\n  " +
                        "\n  ".join(differences) + "\nrerun with the recorded values or choose another --output-dir" +
                        (f", or pass {allow_flag} to continue with the new ones" if allow_flag else ""))


def done(path):
    """A stage folder (iterate.py's) is finished: it holds done.json."""
    return os.path.exists(os.path.join(path, DONE))


def mark_done(path, info):
    """Finish a stage folder: rank 0 writes done.json (`info`) last, and every rank waits for it."""
    if dist.is_main():
        os.makedirs(path, exist_ok=True)
        atomic_write_json(os.path.join(path, DONE), info)
    dist.barrier()


def nonfinite_message(step, loss, grad_norm, ckpt, saved_step):
    """Non-finite loss or gradient at `step`: no update; the last checkpoint is good (saved after a finite step)."""
    where = (f"resume from the last good checkpoint, {ckpt} (step {saved_step}), with --resume --lr LOWER "
             "--allow-changed-args" if saved_step else "no checkpoint was saved yet: rerun with a lower --lr")
    return (f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; stopped before updating the weights. "
            f"To go on, {where}, or check the data.")


@dataclass
class Run:
    """An output folder held by this run. `resume`: continue from OUTPUT/checkpoint (it exists and was asked for)."""
    out: str
    resume: bool
    lock_file: object = None  # rank 0 only
    tracker: object = None  # rank 0, with --report-to: tracking.Tracker

    staging = property(lambda self: os.path.join(self.out, STAGING))
    metrics_path = property(lambda self: os.path.join(self.staging, "metrics.jsonl"))

    def start_metrics(self, step):
        """metrics.jsonl: on resume the interrupted run's whole lines up to `step`, else empty."""
        if not dist.is_main():
            return
        old = []
        for path in (self.metrics_path, os.path.join(self.out, "metrics.jsonl")) if self.resume else ():
            if os.path.exists(path):
                with open(path) as f:
                    old = [line for line in f if line.endswith("\n")]
                break
        atomic_write_text(self.metrics_path, "".join(line for line in old if json.loads(line)["step"] <= step))

    def log(self, metrics):
        if dist.is_main():
            with writing(self.metrics_path), open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics, allow_nan=False) + "\n")
            if self.tracker is not None:
                self.tracker.log(metrics)

    def publish(self, ckpt, files, keep_checkpoint=True):
        """Rank 0: OUTPUT becomes the finished run: the checkpoint's model files (linked, else copied) and `files`
        join staging/, all move in (done.json, config.json last), older published files go, `ckpt` too unless kept."""
        if not dist.is_main():
            return
        for name in os.listdir(ckpt):
            if not name.startswith(("optimizer.", "rng.", "trainer_state")):
                src, dst = os.path.join(ckpt, name), os.path.join(self.staging, name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(dst)
                try:
                    os.link(src, dst)  # no second copy of the weights
                except OSError:
                    shutil.copy2(src, dst)
        for name, obj in files.items():
            atomic_write_json(os.path.join(self.staging, name), obj)
        names = sorted(set(os.listdir(self.staging)) | {DONE})
        atomic_write_json(os.path.join(self.staging, DONE), {"files": names, **files.get("eval.json", {})})
        earlier = manifest(self.out)["published"]
        claim(self.out, names, published=set(earlier) | set(names))  # a kill from here on: all of them are ours
        for name in (DONE, "config.json"):  # not finished, not loadable, until the end
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out, name))
        for name in sorted(names, key=lambda n: (n == DONE, n == "config.json")):
            if os.path.isdir(os.path.join(self.out, name)):  # a folder (train_ppo.py's value_model/) is not replaced
                shutil.rmtree(os.path.join(self.out, name))  # by a rename: the earlier one goes first
            durable_replace(os.path.join(self.staging, name), os.path.join(self.out, name))
        for name in set(earlier) - set(names):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out, name))
        claim(self.out, [], published=names)
        shutil.rmtree(self.staging)
        if not keep_checkpoint:
            shutil.rmtree(ckpt)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.tracker is not None:
            self.tracker, tracker = None, self.tracker
            tracker.close()
        if self.lock_file is not None:
            unlock(self.lock_file)
            self.lock_file = None


def start(out, args, names, *, resume=False, overwrite=False, allow_changed_args=False, ignore=(), staged=True):
    """Take OUTPUT before any work: lock, refuse foreign files (unless `overwrite`) and changed arguments, claim
    `names`, record `args`, start the tracker. staged: `resume` continues OUTPUT/checkpoint; without, an unfinished
    one is refused unless `overwrite` (a forgotten --resume loses nothing), a finished one cleared. Else: args.json."""
    from minirlhf import tracking  # both import this module
    from minirlhf.checkpoint import recover_dir, step_checkpoints
    out, report_to, ignore = str(out), args.get("report_to"), (*ignore, "report_to")
    names = [*names, report_to] if staged and report_to not in (None, "none") else names  # tensorboard/, wandb/
    error, run = None, Run(out, False)
    if dist.is_main():
        try:
            os.makedirs(out, exist_ok=True)
            run.lock_file = lock(out)
            if not overwrite and (foreign := foreign_files(out)):
                raise UserError(f"{out} holds files this program did not write: {foreign}. A run replaces only what "
                                f"it wrote itself ({MANIFEST}): choose a new or empty --output-dir, or pass "
                                "--overwrite to run here anyway (files of the same names are then replaced)")
            ckpt = os.path.join(out, "checkpoint")
            if staged:
                recover_dir(ckpt)
                state = read_json(os.path.join(ckpt, "trainer_state.json"))
                run.resume = resume and state is not None
                if run.resume and not allow_changed_args:
                    staged_args = os.path.join(out, STAGING, "args.json")
                    check_args(staged_args if os.path.exists(staged_args) else os.path.join(out, "args.json"),
                               args, ignore, "--allow-changed-args")
                if not run.resume:
                    if state is not None and not done(out) and not overwrite:
                        raise UserError(f"{ckpt} holds an unfinished run (step {state['step']}): pass --resume to "
                                        "continue it, or --overwrite to start over (its checkpoint is deleted)")
                    for old in [ckpt, *step_checkpoints(out), os.path.join(out, STAGING)]:  # checkpoint-STEP too
                        shutil.rmtree(old, ignore_errors=True)
            else:
                check_args(os.path.join(out, "args.json"), args, ignore, None)
            claim(out, [*names, STAGING, "checkpoint", DONE] if staged else [*names, "args.json"])
            atomic_write_json(os.path.join(out, STAGING if staged else "", "args.json"), args)
            run.tracker = tracking.start(report_to, out, args, run.resume, group=not staged)
        except BaseException as e:
            run.close()
            if not isinstance(e, UserError):
                raise
            error = str(e)
    error, run.resume = dist.all_gather_objects((error, run.resume))[0]  # every rank stops, or resumes, together
    if error:
        raise UserError(error)
    return run
