"""
Ours against the reference (jingyaogong/minimind-o), side by side: same data, same shapes, same
machine, one run. The reference is imported from a local checkout whose path you give; nothing of
it is copied here. Get one with
    git clone https://github.com/jingyaogong/minimind-o /tmp/minimind-o

Two modes:

    step   one training step (forward, loss, backward, clipping, AdamW) at equal shapes: the same
           batches of synthetic T2A samples with realistic lengths (see bench_train.py), padded to
           the full sample width as the release's data loader does, into
             reference      the reference trainer's own train_epoch (trainer/train_sft_omni.py), fed
                            those batches one by one
             ours           train.optimizer_step on the same tensors (same width)
             ours_longest   the same, each batch cut after its longest sample as train.py's collate
                            does (the shapes differ from here on: the step train.py really runs)
    cli    the whole command line: our train.py against the reference's trainer/train_sft_omni.py
           on the same T2A parquet file (release schema, realistic lengths), one epoch of
           batch_size * steps rows from random weights, wall time from start to exit (start-up and
           the final checkpoint included in both); ours twice, in the release's row order (ours) and with
           --group_by_length (ours_grouped)

    python benchmarks/bench_vs_reference.py step --reference /tmp/minimind-o            # CPU: batch 4 x 512
    python benchmarks/bench_vs_reference.py cli --reference /tmp/minimind-o --steps 10
    python benchmarks/bench_vs_reference.py step --reference /tmp/minimind-o --device cuda \\
        --batch_size 40 --max_seq_len 512 --dtype bfloat16 [--compile]                  # the release's shapes

Every side runs in its own process, so its peak memory is its own; in step mode the sides take turns
step by step, so a machine whose other load comes and goes slows them alike. Each prints one JSON line:
    {"mode", "side", "device", "batch_size", "max_seq_len", "width" (positions per sample in the
     step), "steps", "seconds_per_step" (median of the timed steps; cli: the whole run / steps),
     "samples_per_s", "tokens_per_s" (tokens = positions up to each sample's last label: the same
     useful work for every side), "peak_memory_mib" (CUDA: torch.cuda.max_memory_allocated during
     the steps; CPU: the process's peak resident set, ru_maxrss), "setup_memory_mib" (the same
     before the first step: weights, imports), "load" (1-minute load average when it ended)}
then a last line with the ratios against the reference.

The reference imports `datasets` and `onnxruntime` at the top, which its training never uses; where
they are not installed an empty module stands in for each. Its encoders are not loaded (T2A rows need none).
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2 ** 20
NO_ENCODER = "/nonexistent"          # the reference's trainer then leaves its encoders out (T2A needs none)
UNREACHED = 10 ** 9                  # a step count the reference trainer never reaches: no log or save mid-run
REF_VOICE_FRAMES = 25                # each row's voice prompt: 2 s of reference codes
SIDES = ("reference", "ours", "ours_longest")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("mode", choices=["step", "cli"])
    p.add_argument("--reference", required=True, help="a checkout of jingyaogong/minimind-o (has trainer/ and model/)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch_size", type=int, default=4, help="samples per step (default 4)")
    p.add_argument("--max_seq_len", type=int, default=512, help="sample length (default 512)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (step) or steps in the run (cli) (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, step mode (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision, as train.py --dtype, given to both sides. step: the reference's step runs "
                        "in the same autocast as ours on every device. cli: its trainer autocasts on CUDA only, "
                        "trains in float32 on the CPU whatever --dtype says, and on CUDA takes any --dtype but "
                        "bfloat16 for float16 (default: train.py's, bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (ours: train.py --compile; "
                                                            "the reference: its --use_compile 1)")
    p.add_argument("--use_moe", action="store_true", help="the MoE model on both sides")
    p.add_argument("--hidden_size", type=int, default=768, help="Thinker width (default 768; smaller only for tests: "
                                                                "the reference's Talker stays 768 wide)")
    p.add_argument("--num_hidden_layers", type=int, default=8, help="Thinker blocks (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads per side (default: torch's)")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader processes in cli mode, both sides (default 1)")
    p.add_argument("--tokenizer", default=os.path.join(ROOT, "..", "shared", "tokenizer"),
                   help="folder with the released tokenizer.json (default ../shared/tokenizer)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)       # internal: one side of step mode
    p.add_argument("--batches", help=argparse.SUPPRESS)                   # internal: its batches file
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


# -- shared data ---------------------------------------------------------------------------------

def step_batches(args, path):
    """batch_size * (warmup + steps) synthetic samples as full-width tensors, saved to path."""
    sys.path[:0] = [ROOT, HERE]
    import bench_train
    import minimind_o as mo
    tok = mo.load_tokenizer(args.tokenizer)
    samples = bench_train.synthetic_samples(tok, args.batch_size * (args.warmup + args.steps), args.max_seq_len)
    stack = lambda group, name: torch.stack([getattr(s, name) for s in group])
    batches = [dict(input_ids=stack(g, "input_ids"), text_labels=stack(g, "text_labels"),
                    audio_labels=stack(g, "audio_labels"), spk_emb=stack(g, "spk_emb"),
                    lengths=torch.tensor([s.length for s in g]))
               for g in (samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size))]
    torch.save(batches, path)


def write_t2a_parquet(args, path):
    """batch_size * steps T2A rows in the release's schema (conversations, answer_audios, ref_audios,
    spk_emb), question and reply lengths as bench_train.py draws them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path[:0] = [ROOT, HERE]
    import bench_train
    import minimind_o as mo
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    columns = dict(conversations=[], answer_audios=[], ref_audios=[], spk_emb=[])
    for _ in range(args.batch_size * args.steps):
        conversation, codes = bench_train.draw_exchange(rng, np_rng)
        columns["conversations"].append(json.dumps(conversation))
        columns["answer_audios"].append([codes.tolist()])
        columns["ref_audios"].append(np_rng.integers(0, mo.CODEBOOK_SIZE, REF_VOICE_FRAMES * mo.N_CODEBOOKS).tolist())
        columns["spk_emb"].append(np_rng.standard_normal(mo.SPK_EMBED_DIM).astype(np.float32).tolist())
    schema = pa.schema([("conversations", pa.string()), ("answer_audios", pa.list_(pa.list_(pa.int32()))),
                        ("ref_audios", pa.list_(pa.int32())), ("spk_emb", pa.list_(pa.float32()))])
    pq.write_table(pa.table(columns, schema=schema), path)


# -- measuring -----------------------------------------------------------------------------------

def memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux reports KiB


def result(args, side, seconds, peak, width=None, tokens=None, setup=None):
    """One side's JSON line; width, tokens and setup memory are step mode's only."""
    return dict(mode=args.mode, side=side, device=args.device, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                width=width, steps=args.steps, seconds_per_step=round(seconds, 4),
                samples_per_s=round(args.batch_size / seconds, 3),
                tokens_per_s=None if tokens is None else round(tokens / seconds, 1), peak_memory_mib=round(peak),
                setup_memory_mib=None if setup is None else round(setup), load=os.getloadavg()[0])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args, device):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.dtype))


UNUSED_IMPORTS = ("datasets", "onnxruntime")  # the reference imports them at the top; training never uses them


def stand_ins(tmp):
    """A folder with an empty package for each of UNUSED_IMPORTS that is not installed, for the
    reference's processes to find on PYTHONPATH."""
    folder = os.path.join(tmp, "stand_ins")
    for name in UNUSED_IMPORTS:
        if importlib.util.find_spec(name) is None and not os.path.isdir(os.path.join(folder, name)):
            os.makedirs(os.path.join(folder, name))
            open(os.path.join(folder, name, "__init__.py"), "w").close()
    return folder


# -- step mode: one side per process, the sides taking turns step by step -------------------------
# A busy machine (other jobs come and go) then slows every side alike. Each side's process says "ready"
# once set up, then runs a step each time the parent writes a line, and says "done" after it.

def say(word):
    print(word, flush=True)


def await_turn(device):
    """Wait for this side's turn -> the step's start time."""
    sys.stdin.readline()
    synchronize(device)
    return time.perf_counter()


def end_turn(device):
    """The step's end time, once its work is done; the parent may hand the turn on."""
    synchronize(device)
    end = time.perf_counter()
    say("done")
    return end


#-------------------------------------------------------------

def reference_step_times(args, batches, device):
    """Seconds of each step of the reference trainer's train_epoch over `batches`, its memory, and the
    width of each batch (as given)."""
    sys.path.insert(0, args.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from model.model_omni import OmniConfig
        from trainer import train_sft_omni as trainer
        from trainer.trainer_utils import init_omni_model
        config = OmniConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=args.use_moe)
        model, _ = init_omni_model(config, from_weight="none", tokenizer_path=os.path.join(args.reference, "model"),
                                   audio_encoder_path=NO_ENCODER, vision_model_path=NO_ENCODER, device=str(device))
    # The globals its train_epoch reads, set as its __main__ sets them.
    trainer.args = argparse.Namespace(device=str(device), accumulation_steps=1, grad_clip=1.0, epochs=1,
                                      learning_rate=5e-4, log_interval=UNREACHED, save_interval=UNREACHED)
    trainer.model = torch.compile(model) if args.compile else model
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=args.dtype == "float16" and device.type == "cuda")
    trainer.autocast_ctx = autocast(args, device)
    trainer.omni_config = config
    setup = memory_mib(device)
    times = []

    def loader():  # a step is over when the trainer asks for the next batch
        for b in batches:
            start = await_turn(device)
            yield (b["input_ids"], b["text_labels"], b["audio_labels"], None, torch.zeros(len(b["lengths"]), dtype=torch.long),
                   None, b["spk_emb"])
            times.append(end_turn(device) - start)

    say("ready")
    trainer.train_epoch(0, loader(), UNREACHED)
    return times, setup, [b["input_ids"].shape[-1] for b in batches]


def our_step_times(args, batches, device, cut):
    """Seconds of each train.optimizer_step over `batches` (cut: after the longest sample), memory, and
    the width of each batch it ran."""
    sys.path.insert(0, ROOT)
    import train
    flags = ["--data", "unused.parquet", "--from_weight", "none", "--batch_size", str(args.batch_size),
             "--max_seq_len", str(args.max_seq_len), "--hidden_size", str(args.hidden_size),
             "--num_hidden_layers", str(args.num_hidden_layers), "--device", str(device), "--dtype", args.dtype]
    flags += ["--use_moe"] * args.use_moe + ["--compile"] * args.compile
    train_args = train.parse_args(flags)
    learner, _ = train.build_learner(train_args, train.Processes(0, 1, device), None)
    setup = memory_mib(device)
    times, widths = [], []
    say("ready")
    for b in batches:
        full = b["input_ids"].shape[-1]
        multiple = train.COMPILE_WIDTH if args.compile else 1  # as train.collate rounds the width for --compile
        width = min(math.ceil(int(b["lengths"].max()) / multiple) * multiple, full) if cut else full
        widths.append(width)
        batch = train.Batch(b["input_ids"][..., :width], b["text_labels"][..., :width], b["audio_labels"][..., :width],
                            speech=None, speech_lengths=None, image=None, spk_emb=b["spk_emb"],
                            tokens=int(b["lengths"].sum()), bad_rows=[])
        start = await_turn(device)
        train.optimizer_step(learner, iter([batch.to(device)]), 1, train.Encoders(), train_args, 1)
        times.append(end_turn(device) - start)
    return times, setup, widths


def run_side(args):
    """One side of step mode, in this process: prints its JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = torch.load(args.batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.side == "reference":
        times, setup, widths = reference_step_times(args, batches, device)
    else:
        times, setup, widths = our_step_times(args, batches, device, cut=args.side == "ours_longest")
    tokens = np.mean([int(b["lengths"].sum()) for b in batches[args.warmup:]])
    print(json.dumps(result(args, args.side, statistics.median(times[args.warmup:]), memory_mib(device),
                            round(float(np.mean(widths[args.warmup:])), 1), float(tokens), setup)), flush=True)


def side_flags(args):
    """The command-line flags a child process needs to repeat this run's settings."""
    flags = [args.mode, "--reference", args.reference, "--device", args.device, "--batch_size", str(args.batch_size),
             "--max_seq_len", str(args.max_seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--dtype", args.dtype, "--hidden_size", str(args.hidden_size),
             "--num_hidden_layers", str(args.num_hidden_layers), "--tokenizer", args.tokenizer]
    flags += ["--compile"] * args.compile + ["--use_moe"] * args.use_moe
    return flags + (["--threads", str(args.threads)] if args.threads else [])


def child_env(args, tmp, side):
    """The environment of one side's process: the CPU threads, and the stand-ins for the reference."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    if side == "reference":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [stand_ins(tmp), env.get("PYTHONPATH")]))
    return env


def step_mode(args, tmp):
    path = os.path.join(tmp, "batches.pt")
    step_batches(args, path)
    procs, logs = {}, {}
    for side in SIDES:  # set up one at a time, so that no side's set-up slows another's steps
        logs[side] = open(os.path.join(tmp, f"{side}.log"), "w+")
        procs[side] = subprocess.Popen([sys.executable, os.path.abspath(__file__), *side_flags(args), "--side", side,
                                        "--batches", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=logs[side], text=True, env=child_env(args, tmp, side))
        next_word(procs[side], side, "ready", logs[side])
    for _ in range(args.warmup + args.steps):
        for side, proc in procs.items():
            proc.stdin.write("\n")
            proc.stdin.flush()
            next_word(proc, side, "done", logs[side])
    lines = {}
    for side, proc in procs.items():
        lines[side] = json.loads(next_word(proc, side, "{", logs[side]))
        proc.wait()
        print(json.dumps(lines[side]), flush=True)
    return lines


def next_word(proc, side, word, log):
    """The next line of a side's output that starts with word (others are the reference's chatter)."""
    for line in proc.stdout:
        if line.startswith(word):
            return line
    proc.wait()
    log.seek(0)
    sys.exit(f"bench_vs_reference.py: the {side} side failed:\n{log.read()[-3000:]}")


# -- cli mode ------------------------------------------------------------------------------------

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
        sys.exit(f"bench_vs_reference.py: {' '.join(command[:3])} ... failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024 / MIB, output


def cli_commands(args, tmp, data):
    """Our train.py (in the release's order, and grouped by length) and the reference trainer, each with its
    own flags for the same run."""
    ours = [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--from_weight", "none",
            "--tokenizer", args.tokenizer, "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
            "--epochs", "1", "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
            "--num_workers", str(args.num_workers), "--device", args.device, "--dtype", args.dtype,
            "--out_dir", os.path.join(tmp, "ours"), "--log_every", str(UNREACHED), "--save_every", "0"]
    ours += ["--compile"] * args.compile + ["--use_moe"] * args.use_moe
    # The reference reads its tokenizer from ../model and writes ../out and ../checkpoints: a run folder
    # whose ../model is the checkout's keeps all of that out of the checkout.
    run = os.path.join(tmp, "reference", "run")
    os.makedirs(run)
    os.symlink(os.path.join(os.path.abspath(args.reference), "model"), os.path.join(tmp, "reference", "model"))
    reference = [sys.executable, os.path.join(os.path.abspath(args.reference), "trainer", "train_sft_omni.py"),
                 "--data_path", data, "--from_weight", "none", "--batch_size", str(args.batch_size),
                 "--max_seq_len", str(args.max_seq_len), "--epochs", "1", "--hidden_size", str(args.hidden_size),
                 "--num_hidden_layers", str(args.num_hidden_layers), "--num_workers", str(args.num_workers),
                 "--device", args.device, "--dtype", args.dtype, "--use_moe", str(int(args.use_moe)),
                 "--use_compile", str(int(args.compile)), "--audio_encoder_dir", NO_ENCODER, "--vision_dir", NO_ENCODER,
                 "--log_interval", str(UNREACHED), "--save_interval", str(UNREACHED)]
    return {"reference": (reference, run), "ours": (ours, ROOT), "ours_grouped": (ours + ["--group_by_length"], ROOT)}


CLI_DONE = {"reference": "({steps}/{steps})", "ours": "trained {steps} steps",   # what each prints after its last step
            "ours_grouped": "trained {steps} steps"}


def cli_mode(args, tmp):
    data = os.path.join(tmp, "t2a.parquet")
    write_t2a_parquet(args, data)
    lines = {}
    for side, (command, cwd) in cli_commands(args, tmp, data).items():
        seconds, peak, output = run_cli(command, cwd, child_env(args, tmp, side))
        if CLI_DONE[side].format(steps=args.steps) not in output:
            sys.exit(f"bench_vs_reference.py: the {side} run did not train {args.steps} steps:\n{output[-2000:]}")
        lines[side] = dict(result(args, side, seconds / args.steps, peak), wall_seconds=round(seconds, 1))
        print(json.dumps(lines[side]), flush=True)
    return lines


def main():
    args = parse_args()
    if args.side:
        return run_side(args)
    if not os.path.isfile(os.path.join(args.reference, "trainer", "train_sft_omni.py")):
        sys.exit(f"bench_vs_reference.py: --reference {args.reference} has no trainer/train_sft_omni.py; give a checkout "
                 "of jingyaogong/minimind-o")
    with tempfile.TemporaryDirectory() as tmp:
        lines = (step_mode if args.mode == "step" else cli_mode)(args, tmp)
    ref = lines["reference"]
    print(json.dumps({"mode": args.mode, "vs_reference": {
        side: dict(speed=round(line["samples_per_s"] / ref["samples_per_s"], 3),
                   peak_memory=round(line["peak_memory_mib"] / ref["peak_memory_mib"], 3))
        for side, line in lines.items() if side != "reference"}}))


if __name__ == "__main__":
    main()
