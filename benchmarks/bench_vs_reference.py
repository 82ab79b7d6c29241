"""
Ours against the release's own training code (jingyaogong/minimind-o), side by side: same data, same shapes,
same machine, one run. The release's code is imported from a checkout (--reference, or $MINIMIND_O_REFERENCE)
made with `git clone https://github.com/jingyaogong/minimind-o /tmp/minimind-o`; nothing of it is copied here.

    step   one training step on the same batches of synthetic T2A rows (benchmarks/common.py), padded to the
           full width as the release's data loader does: the release trainer's own train_epoch (reference),
           train.py's optimizer step on the same tensors (ours), and on each batch cut after its longest
           sample (ours_longest: the step train.py really runs); each side in its own process, so that its
           peak memory is its own, the sides taking turns step by step
    cli    the whole command line, from start to exit: train.py in the release's row order (ours) and with
           --group_by_length (ours_grouped) against the release's trainer, on the same T2A parquet file

    python benchmarks/bench_vs_reference.py step --reference /tmp/minimind-o            # CPU: batch 4 x 512
    python benchmarks/bench_vs_reference.py cli --reference /tmp/minimind-o --steps 10
    python benchmarks/bench_vs_reference.py step --device cuda --batch_size 40 --dtype bfloat16 [--compile]

Each side prints one JSON line (samples_per_s, tokens_per_s counting positions up to each sample's last
label, peak_memory_mib: CUDA's max_memory_allocated or the process's peak resident set, ...), then a line of
ratios against the reference. The release's trainer imports `datasets` and `onnxruntime`, which its training
never uses: where they are not installed an empty module stands in for each.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace

import common
import numpy as np
import torch

MIB = 2 ** 20
NO_ENCODER = "/nonexistent"          # the release's trainer then leaves its encoders out (T2A needs none)
UNREACHED = 10 ** 9                  # a step count the release's trainer never reaches: no log or save mid-run
REF_VOICE_FRAMES = 25                # cli rows' voice prompt: 2 s of reference codes
SIDES = ("reference", "ours", "ours_longest")
UNUSED_IMPORTS = ("datasets", "onnxruntime")
CLI_DONE = {"reference": "({steps}/{steps})", "ours": "trained {steps} steps",   # what each prints after its last step
            "ours_grouped": "trained {steps} steps"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["step", "cli"])
    p.add_argument("--reference", help="a checkout of jingyaogong/minimind-o (default: $MINIMIND_O_REFERENCE)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch_size", type=int, default=4, help="samples per step (default 4)")
    p.add_argument("--max_seq_len", type=int, default=512, help="sample length (default 512)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (step) or steps in the run (cli) (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, step mode (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision, as train.py --dtype, both sides (default bfloat16 on CUDA, float32 on the "
                        "CPU); the release's trainer in cli mode trains in float32 on the CPU whatever it says")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (ours: train.py --compile; "
                                                            "the reference: its --use_compile 1)")
    p.add_argument("--hidden_size", type=int, default=768, help="Thinker width (default 768; smaller only for tests: "
                                                                "the reference's Talker stays 768 wide)")
    p.add_argument("--num_hidden_layers", type=int, default=8, help="Thinker blocks (default 8)")
    p.add_argument("--tokenizer", help="folder with the released tokenizer.json (default: $MINIMIND_TOKENIZER, else "
                                       "models/minimind-3o)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)       # internal: one side of step mode
    p.add_argument("--batches", help=argparse.SUPPRESS)                   # internal: its batches file
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def model_flags(args):
    """The model and precision flags both of our sides give train.py."""
    flags = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
             "--dtype", args.dtype]
    return flags + ["--compile"] * args.compile


def result(args, side, seconds, peak, width=None, tokens=None):
    """One side's JSON line; width and tokens are step mode's only."""
    return dict(mode=args.mode, side=side, device=args.device, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                width=width, steps=args.steps, seconds_per_step=round(seconds, 4),
                samples_per_s=round(args.batch_size / seconds, 3),
                tokens_per_s=None if tokens is None else round(tokens / seconds, 1), peak_memory_mib=round(peak),
                load=os.getloadavg()[0])


def side_env(tmp):
    """The sides' environment: an empty package on PYTHONPATH for each of UNUSED_IMPORTS that is not installed."""
    folder = os.path.join(tmp, "stand_ins")
    for name in UNUSED_IMPORTS:
        if importlib.util.find_spec(name) is None:
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            open(os.path.join(folder, name, "__init__.py"), "w").close()
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")])))


# -----------------------------------------------------------------------------------------------
# step mode: one side per process, which says "ready" once set up, then runs a step each time the parent
# writes a line and says "done" after it
# -----------------------------------------------------------------------------------------------

def step_batches(args, path):
    """batch_size * (warmup + steps) synthetic T2A samples from train.py's dataset, each batch both at the full
    width and cut after its longest sample, saved to path."""
    import data
    import minimind_o as mo
    import train
    rows = [common.write_rows(path + ".parquet", args.batch_size * (args.warmup + args.steps))]
    dataset = data.OmniDataset(data.ParquetRows(rows), mo.load_tokenizer(args.tokenizer), args.max_seq_len,
                               skip_bad_rows=True)   # a row whose reply starts after max_seq_len teaches nothing
    samples = [dataset[i] for i in range(len(dataset))]
    multiple = train.COMPILE_WIDTH if args.compile else 1  # as train.py rounds the width for --compile
    groups = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    torch.save([dict(full=data.collate([replace(s, length=args.max_seq_len - 1) for s in g]),
                     longest=data.collate(g, width_multiple=multiple)) for g in groups], path)


def turns(batches, device, times):
    """Yield each batch when the parent hands this side its turn; the time until the next one is asked for
    (the step, the GPU synchronised) goes to `times`, and the parent hears "done"."""
    for batch in batches:
        sys.stdin.readline()
        common.synchronize(device)
        start = time.perf_counter()
        yield batch
        common.synchronize(device)
        times.append(time.perf_counter() - start)
        print("done", flush=True)


def reference_steps(args, batches, device, times):
    """The release trainer's train_epoch over the batches, its globals set as its __main__ sets them."""
    sys.path.insert(0, args.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from model.model_omni import OmniConfig
        from trainer import train_sft_omni as trainer
        from trainer.trainer_utils import init_omni_model
        config = OmniConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, )
        model, _ = init_omni_model(config, from_weight="none", tokenizer_path=os.path.join(args.reference, "model"),
                                   audio_encoder_path=NO_ENCODER, vision_model_path=NO_ENCODER, device=str(device))
    trainer.args = argparse.Namespace(device=str(device), accumulation_steps=1, grad_clip=1.0, epochs=1,
                                      learning_rate=5e-4, log_interval=UNREACHED, save_interval=UNREACHED)
    trainer.model = torch.compile(model) if args.compile else model
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=args.dtype == "float16" and device.type == "cuda")
    trainer.autocast_ctx = (contextlib.nullcontext() if args.dtype == "float32"
                            else torch.autocast(device.type, dtype=getattr(torch, args.dtype)))
    trainer.omni_config = config
    print("ready", flush=True)
    loader = ((b.input_ids, b.text_labels, b.audio_labels, None, torch.zeros(len(b.input_ids), dtype=torch.long), None,
               b.spk_emb) for b in turns([b["full"] for b in batches], device, times))
    trainer.train_epoch(0, loader, UNREACHED)


def our_steps(args, batches, device, times):
    """train.py's optimizer step over the batches, at the full width or (ours_longest) cut."""
    learner, train_args = common.learner(device, args.batch_size, args.max_seq_len, model_flags(args))
    print("ready", flush=True)
    for batch in turns([b["full" if args.side == "ours" else "longest"] for b in batches], device, times):
        common.train_step(learner, train_args, batch.to(device))


def run_side(args):
    """One side of step mode, in this process: prints its JSON line."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = torch.load(args.batches, weights_only=False)
    times = []
    (reference_steps if args.side == "reference" else our_steps)(args, batches, device, times)
    timed = [b["full" if args.side != "ours_longest" else "longest"] for b in batches[args.warmup:]]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    tokens = np.mean([b["longest"].tokens for b in batches[args.warmup:]])
    print(json.dumps(result(args, args.side, statistics.median(times[args.warmup:]), peak / MIB,
                            round(float(np.mean([b.input_ids.shape[-1] for b in timed])), 1), float(tokens))), flush=True)


def next_line(proc, side, start, log):
    """The next line of a side's output that starts with `start` (others are the reference's chatter)."""
    for line in proc.stdout:
        if line.startswith(start):
            return line
    proc.wait()
    log.seek(0)
    common.fail(f"the {side} side failed:\n{log.read()[-3000:]}")


def step_mode(args, tmp):
    path = os.path.join(tmp, "batches.pt")
    step_batches(args, path)
    procs, logs = {}, {}
    for side in SIDES:  # set up one at a time, so that no side's set-up slows another's steps
        logs[side] = open(os.path.join(tmp, f"{side}.log"), "w+")
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--reference", args.reference,
                   "--tokenizer", args.tokenizer, "--dtype", args.dtype, "--side", side, "--batches", path]
        procs[side] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=logs[side], text=True, env=side_env(tmp))
        next_line(procs[side], side, "ready", logs[side])
    for _ in range(args.warmup + args.steps):
        for side, proc in procs.items():
            proc.stdin.write("\n")
            proc.stdin.flush()
            next_line(proc, side, "done", logs[side])
    lines = {side: json.loads(next_line(proc, side, "{", logs[side])) for side, proc in procs.items()}
    for side, proc in procs.items():
        proc.wait()
        print(json.dumps(lines[side]), flush=True)
    return lines


# -----------------------------------------------------------------------------------------------
# cli mode
# -----------------------------------------------------------------------------------------------

def run_cli(command, cwd, env):
    """Run a training command to its end -> (wall seconds, its peak resident set in MiB, its output)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        common.fail(f"{' '.join(command[:3])} ... failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024 / MIB, output


def cli_commands(args, tmp, data):
    """Our train.py (in the release's order, and grouped by length) and the release's trainer, each with its
    own flags for the same run -> {side: (command, working folder)}."""
    size = ["--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len), "--epochs", "1",
            "--num_workers", "1", "--device", args.device, "--from_weight", "none"]
    ours = [sys.executable, str(common.ROOT / "train.py"), "--data", data, "--tokenizer", args.tokenizer, *size,
            *model_flags(args), "--out_dir", os.path.join(tmp, "ours"), "--log_every", str(UNREACHED), "--save_every", "0"]
    # The release's trainer reads its tokenizer from ../model and writes ../out and ../checkpoints: a run folder
    # whose ../model is the checkout's keeps all of that out of the checkout.
    run = os.path.join(tmp, "reference", "run")
    os.makedirs(run)
    os.symlink(os.path.join(args.reference, "model"), os.path.join(tmp, "reference", "model"))
    reference = [sys.executable, os.path.join(args.reference, common.REFERENCE_TRAINER), "--data_path", data, *size,
                 "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
                 "--dtype", args.dtype, "--use_compile", str(int(args.compile)),
                 "--audio_encoder_dir", NO_ENCODER, "--vision_dir", NO_ENCODER,
                 "--log_interval", str(UNREACHED), "--save_interval", str(UNREACHED)]
    return {"reference": (reference, run), "ours": (ours, common.ROOT),
            "ours_grouped": (ours + ["--group_by_length"], common.ROOT)}


def cli_mode(args, tmp):
    data = common.write_rows(os.path.join(tmp, "t2a.parquet"), args.batch_size * args.steps, voice_frames=REF_VOICE_FRAMES)
    lines = {}
    for side, (command, cwd) in cli_commands(args, tmp, data).items():
        seconds, peak, output = run_cli(command, cwd, side_env(tmp))
        if CLI_DONE[side].format(steps=args.steps) not in output:
            common.fail(f"the {side} run did not train {args.steps} steps:\n{output[-2000:]}")
        lines[side] = dict(result(args, side, seconds / args.steps, peak), wall_seconds=round(seconds, 1))
        print(json.dumps(lines[side]), flush=True)
    return lines


def main():
    args = parse_args()
    if args.side:
        return run_side(args)
    args.reference = common.reference_checkout(args.reference)
    args.tokenizer = os.path.abspath(common.tokenizer_folder(args.tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        lines = (step_mode if args.mode == "step" else cli_mode)(args, tmp)
    ref = lines["reference"]
    print(json.dumps({"mode": args.mode, "vs_reference": {
        side: dict(speed=round(line["samples_per_s"] / ref["samples_per_s"], 3),
                   peak_memory=round(line["peak_memory_mib"] / ref["peak_memory_mib"], 3))
        for side, line in lines.items() if side != "reference"}}))


if __name__ == "__main__":
    main()
