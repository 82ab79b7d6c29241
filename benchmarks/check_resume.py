"""
Does a torchrun training run resume where it was killed? Three runs of train.py under torchrun on the same
demo rows and settings: one whole; one killed (SIGKILL to torchrun and its workers) once it has logged
--kill_after steps; then that one again with --resume, which must pick up after the step its resume file
holds, log every step once, and log the whole run's losses.

    python benchmarks/check_resume.py --device cuda       # NCCL, one process (what gpu_check.sh runs)
    python benchmarks/check_resume.py --device cpu        # gloo
    python benchmarks/check_resume.py --device cuda --nproc 2

Prints what it saw and one JSON line (also appended to --json).
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

import data

# The same batches in the same order give the same losses: exactly on the CPU (float32); on a GPU within
# bf16 autocast and atomic-add (embedding backward) reordering, which differ from run to run.
LOSS_TOLERANCE = {"cpu": 1e-5, "cuda": 2e-3}
NAME = "resume_check"
TINY_MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "64", "--batch_size", "4"]


def torchrun(args, out_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            str(common.ROOT / "train.py"), "--data", args.data, "--from_weight", "none", "--device", args.device,
            "--tokenizer", args.tokenizer, "--out_dir", str(out_dir), "--save_weight", NAME, "--max_steps",
            str(args.steps), "--save_every", "1", "--log_every", "1", "--num_workers", "0", *TINY_MODEL, *extra]


def run(cmd, timeout):
    """Run to the end -> (seconds taken, its output); a failed run raises with the end of its output."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def process_tree(pid):
    """pid and every process below it: torchrun's workers leave its process group, so killing the group would
    leave them training on."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree = {pid}
    while below := {p for p, parent in parents.items() if parent in tree} - tree:
        tree |= below
    return tree


def run_and_kill(cmd, metrics, kill_after, timeout):
    """Start the run and SIGKILL torchrun and its workers at once (as a crash would) once `metrics` has
    kill_after lines -> seconds until the kill."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
                break
            time.sleep(0.02)
    finally:
        for pid in process_tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - start


def losses(out_dir):
    with open(out_dir / f"{NAME}_metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def check(args, work):
    """The three runs -> the result, with what went wrong in `problems`."""
    whole_dir, killed_dir = work / "whole", work / "killed"
    seconds = {"whole": run(torchrun(args, whole_dir), args.timeout)[0]}
    seconds["killed"] = run_and_kill(torchrun(args, killed_dir), killed_dir / f"{NAME}_metrics.jsonl",
                                     args.kill_after, args.timeout)
    stopped_at = torch.load(killed_dir / f"{NAME}_resume.pt", weights_only=False)["position"]["step"]
    seconds["resumed"], said = run(torchrun(args, killed_dir, "--resume"), args.timeout)
    whole, resumed = losses(whole_dir), losses(killed_dir)
    diff = max((abs(a[1] - b[1]) / max(1.0, abs(a[1])) for a, b in zip(whole, resumed)), default=float("inf"))
    tolerance = LOSS_TOLERANCE[args.device.split(":")[0]]
    problems = [problem for failed, problem in [
        (not 0 < stopped_at < args.steps, f"killed at step {stopped_at}: not part-way through {args.steps} steps"),
        # the same losses from a fresh start would prove nothing
        (f"resuming after step {stopped_at}" not in said, f"the resumed run did not say it resumed after {stopped_at}"),
        ([s for s, _ in resumed] != list(range(1, args.steps + 1)),
         f"the resumed run logged steps {[s for s, _ in resumed]}, not 1..{args.steps} once each"),
        (diff > tolerance, f"losses differ from the whole run's by up to {diff:.2e} (> {tolerance:.0e})")] if failed]
    return dict(check="torchrun resume", ok=not problems, problems=problems, device=args.device, nproc=args.nproc,
                steps=args.steps, stopped_at=stopped_at, max_loss_diff=diff, run_seconds=seconds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda: NCCL; cpu: gloo")
    p.add_argument("--nproc", type=int, default=1, help="torchrun --nproc_per_node")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kill_after", type=int, default=2, help="logged steps before the kill")
    p.add_argument("--tokenizer", help="folder with the released tokenizer.json (default: $MINIMIND_TOKENIZER, else "
                                       "models/minimind-3o)")
    p.add_argument("--timeout", type=float, default=120, help="seconds per run")
    p.add_argument("--json", help="also append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if not 0 < args.kill_after < args.steps:
        p.error(f"--kill_after {args.kill_after} must be between 0 and --steps {args.steps}")
    args.tokenizer = common.tokenizer_folder(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="resume_check_") as tmp:
        args.data = data.write_demo_data(os.path.join(tmp, "rows.parquet"), rows=64)
        try:
            result = check(args, Path(tmp))
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            result = dict(check="torchrun resume", ok=False, problems=[str(e)[-3000:]], device=args.device)
    for problem in result["problems"]:
        print(f"FAIL {problem}")
    if result["ok"]:
        print(f"torchrun resume on {args.device} x{args.nproc}: killed after step {result['stopped_at']}, resumed "
              f"to {args.steps}; losses as the whole run's (max difference {result['max_loss_diff']:.1e}); runs "
              + ", ".join(f"{k} {v:.1f} s" for k, v in result["run_seconds"].items()))
    print(json.dumps(result))
    common.append_json(args.json, [result])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
