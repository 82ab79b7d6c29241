"""
Train MiniMind-O: one file, one loop, from parquet rows in the release's schema to a checkpoint.

    python train.py                                   # a CPU demo of several minutes, on data it makes itself
    python train.py --data dataset/sft_t2a_mini.parquet --from_weight out/llm_768.pth --save_weight sft_zero
    torchrun --nproc_per_node 4 train.py --data ...   # the same on 4 GPUs (DistributedDataParallel)
    python train.py --data ... --resume               # continue a killed run exactly where it stopped
    python train.py --data ... --augment none --encoder_cache cache   # encode each question/image once
    python train.py --prepare my_manifest.jsonl my_data.parquet       # your own recordings -> --data file

What happens, in the order of this file (the data side, from parquet rows to padded batches, the frozen
encoders and their cache, the demo's data and --prepare, is data.py):
  1. command line          every flag, its default, and what the demo uses instead
  2. model and schedule    from a text-only MiniMind, a previous stage, or random; AdamW (fused),
                           cosine lr, --grad_checkpointing, --compile
  3. checkpoints           the release's fp16 weights + a separate resume file, both written atomically
  4. the training loop     accumulation, bf16 autocast, clipping, DDP, progress bar, metrics, loss plot,
                           a step out of GPU memory said in one line with the settings that need less

A training run writes into --out_dir: `<save_weight>_<hidden>[_moe].pth` (the weights, loadable by
`files.load_model` and chat.py), `<save_weight>_resume.pt` (everything else needed to resume),
`<save_weight>_metrics.jsonl` (one line per logged step) and `<save_weight>_loss.png`.
"""
import argparse
import contextlib
import fcntl
import functools
import glob
import json
import math
import os
import pickle
import random
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import minimind_o as mo
import data
import files

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------------------------
# 1. Command line
# -----------------------------------------------------------------------------------------------
# The defaults follow the release's train_sft_omni.py. Without --data, train.py runs its demo: the DEMO
# preset replaces those defaults (a flag given still wins).

# The demo's max_seq_len leaves its two-exchange rows (~70 tokens) whole: cut_conversation keeps an earlier
# exchange only with 100 tokens to spare, so at 96 every row was cut to its first exchange, the model never
# saw a conversation go on, and a second question in the chat got blank lines back. Batches are padded to
# their longest sample, so the longer limit costs nothing.
DEMO = dict(from_weight="none", out_dir="out/demo", save_weight="demo", hidden_size=64, num_hidden_layers=4,
            max_seq_len=192, batch_size=8, learning_rate=2e-3, epochs=6, num_workers=0, log_every=1,
            save_every=50)
TOKENIZER = files.PARTS["tokenizer"]   # the released tokenizer: where it goes by default, how to get it


MIN_SEQ_LEN = 16  # a one-turn conversation's template alone takes about 10 tokens
COMPILE_WIDTH = 64  # --compile: batch widths are multiples of this (see compiled)


at_least_0 = files.number(int, lambda n: n >= 0, "a number >= 0")
probability = files.number(float, lambda p: 0 <= p <= 1, "a probability (0 to 1)")
sequence_length = files.number(int, lambda n: n >= MIN_SEQ_LEN, f"a length of at least {MIN_SEQ_LEN} tokens")

DESCRIPTION = "\n\n".join([
    "Train MiniMind-O (Thinker-Talker) on parquet rows in the release's schema.",
    textwrap.fill("Without --data it runs the demo: it writes a small made-up dataset and trains a tiny model on it "
                  "from random weights, on the CPU in several minutes (its progress bar gives the estimate), with "
                  "these settings unless a flag says otherwise: "
                  + ", ".join(f"--{name} {value}" for name, value in DEMO.items()) + ".", width=100)])

EXAMPLES = """\
examples:
  python train.py                                      the demo: a tiny model on made-up rows, on the CPU
  python train.py --data dataset/sft_t2a_mini.parquet --from_weight out/llm_768.pth --save_weight sft_zero \\
      --learning_rate 5e-4 --batch_size 40 --max_seq_len 512            the release's mini stage 1 (text to speech)
  python train.py --data dataset/sft_a2a_mini.parquet --from_weight out/sft_zero_768.pth --save_weight sft_zero \\
      --mode audio_proj --learning_rate 5e-4 --batch_size 40 --max_seq_len 640      stage 2: the audio projector
  python train.py --data dataset/sft_a2a_mini.parquet --from_weight out/sft_zero_768.pth --save_weight sft_zero \\
      --learning_rate 2e-5 --batch_size 16 --max_seq_len 768                       stage 3: all of it, speech in
  torchrun --nproc_per_node 4 train.py ... --batch_size 10              the same on 4 GPUs (per-process batches)
  python train.py ... --resume                         continue a killed run exactly where it stopped
  python train.py --prepare my/manifest.jsonl my/data.parquet       your own recordings -> rows for --data

The release's recipes (stage order, modes, learning rates, lengths) are in README.md and docs/training.md;
what each option costs and saves (--dtype, --grad_checkpointing, --compile, --group_by_length,
--encoder_cache) is measured in docs/performance.md.
"""


def parse_args(argv=None):
    # Raw: the description's and the examples' own line breaks stay
    p = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION,
                                epilog=EXAMPLES)
    data_flags(p.add_argument_group("data"))
    model_flags(p.add_argument_group("model"))
    optimisation_flags(p.add_argument_group("optimisation"))
    output_flags(p.add_argument_group("output"))
    prepare_flags(p.add_argument_group("data preparation (--prepare)"))
    args = p.parse_args(argv)
    if args.data is None:  # the demo preset, under the flags given
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)
    return args


def data_flags(data):
    data.add_argument("--data", nargs="+", metavar="PARQUET",
                      help="parquet files in the release's schema (README.md, 'Your own data'); none: the demo")
    data.add_argument("--max_seq_len", type=sequence_length, default=512,
                      help="sample length in tokens; longer conversations are cut (default %(default)s)")
    data.add_argument("--augment", choices=["both", "wave", "spec", "none"], default="both",
                      help="the release's question-audio augmentations: waveform, spectrogram (default %(default)s)")
    data.add_argument("--scheduled_sampling", type=probability, default=0.05,
                      help="chance that a labelled input id is replaced by a random one (default %(default)s)")
    data.add_argument("--skip_bad_rows", action="store_true",
                      help="report and skip malformed rows (or --prepare lines) instead of stopping at the first")
    data.add_argument("--group_by_length", action="store_true",
                      help="batch rows of similar length together: less padding, not the release's row order")
    data.add_argument("--num_workers", type=at_least_0, default=4,
                      help="DataLoader processes per GPU (default %(default)s)")
    data.add_argument("--tokenizer",
                      help=f"folder with tokenizer.json (default: --from_weight's folder, else {TOKENIZER.place})")
    data.add_argument("--speech_encoder", default="models/SenseVoiceSmall",
                      help="SenseVoiceSmall folder, for rows with question audio (default %(default)s)")
    data.add_argument("--vision_encoder", default="models/siglip2-base-p32-256-ve",
                      help="SigLIP2 folder, for rows with images (default %(default)s)")
    data.add_argument("--encoder_cache", metavar="DIR",
                      help="store the frozen encoders' outputs in DIR, to read back in later epochs and runs")


def model_flags(model):
    model.add_argument("--from_weight", default="out/llm_768.pth",
                       help="start: llm_768.pth, a previous stage's .pth or folder, or 'none' (default %(default)s)")
    model.add_argument("--mode", choices=["all", "audio_proj", "vision_proj"], default="all",
                       help="what trains: everything, or only the speech or image projector (default %(default)s)")
    model.add_argument("--use_moe", action="store_true", help="mixture-of-experts FFNs, with --from_weight none")
    model.add_argument("--hidden_size", type=files.positive, default=768,
                       help="Thinker and Talker width, with --from_weight none (default %(default)s)")
    model.add_argument("--num_hidden_layers", type=files.positive, default=8,
                       help="Thinker blocks, with --from_weight none; the Talker has half (default %(default)s)")


def optimisation_flags(opt):
    opt.add_argument("--epochs", type=files.positive, default=1, help="passes over the data (default %(default)s)")
    opt.add_argument("--max_steps", type=files.positive, help="stop after this many optimizer steps")
    opt.add_argument("--batch_size", type=files.positive, default=32,
                     help="samples per GPU per micro-batch (default %(default)s)")
    opt.add_argument("--accumulation_steps", type=files.positive, default=1,
                     help="micro-batches summed before each optimizer step (default %(default)s)")
    opt.add_argument("--learning_rate", type=files.finite_above_0, default=5e-4,
                     help="peak lr of the cosine schedule, which ends at a tenth of it (default %(default)s)")
    opt.add_argument("--weight_decay", type=files.finite_at_least_0, default=0.01,
                     help="AdamW weight decay (default %(default)s)")
    opt.add_argument("--grad_clip", type=files.finite_above_0, default=1.0,
                     help="clip the gradient norm to this (default %(default)s)")
    opt.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                     help="autocast precision (default bfloat16 on a GPU, float32 on the CPU; float16 needs a GPU)")
    opt.add_argument("--grad_checkpointing", action="store_true",
                     help="recompute each block in the backward pass: 2.5-3x less activation memory")
    opt.add_argument("--compile", action="store_true",
                     help=f"torch.compile the block stacks, batch widths rounded up to a multiple of {COMPILE_WIDTH}")
    opt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cuda, cuda:N, mps or cpu (default %(default)s); under torchrun each process takes its GPU")
    opt.add_argument("--seed", type=files.random_seed, default=42,
                     help="seeds the weights, the data order and every per-sample choice (default %(default)s)")


def output_flags(out):
    out.add_argument("--out_dir", default="out", help="where checkpoints and logs go (default %(default)s)")
    out.add_argument("--save_weight", default="sft_omni",
                     help="checkpoint name: <out_dir>/<save_weight>_<hidden>[_moe].pth (default %(default)s)")
    out.add_argument("--save_every", type=at_least_0, default=1000,
                     help="optimizer steps between checkpoints, 0 for the end only (default %(default)s)")
    out.add_argument("--log_every", type=files.positive, default=10,
                     help="optimizer steps between metric lines (default %(default)s)")
    out.add_argument("--resume", action="store_true",
                     help="continue from <out_dir>/<save_weight>_resume.pt exactly where it was written")


def prepare_flags(prep):
    prep.add_argument("--prepare", nargs=2, metavar=("MANIFEST", "OUT"),
                      help="instead of training, turn a JSON-lines manifest of recordings into OUT, a --data file")
    prep.add_argument("--mimi", default="models/mimi",
                      help=f"folder with {files.MIMI_WEIGHTS} (or the file) (default %(default)s)")
    prep.add_argument("--campplus", default="models/campplus",
                      help=f"folder with {files.CAMPP_WEIGHTS}, for lines that name a voice (default %(default)s)")
    prep.add_argument("--prepare_chunk", type=int, default=data.PREPARE_CHUNK,
                      help="manifest lines per part file, kept when a killed --prepare starts again "
                           "(default %(default)s)")


# -----------------------------------------------------------------------------------------------
# 2. Model, optimizer and learning-rate schedule
# -----------------------------------------------------------------------------------------------

def build_model(args):
    """Random weights, the text-only MiniMind (the Talker then starts as a copy of the last Thinker
    blocks), or a previous stage's checkpoint. A missing file says where the published one is."""
    torch.manual_seed(args.seed)  # random init (the whole model, or the parts a checkpoint lacks)
    if args.from_weight == "none":
        cfg = mo.OmniConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                            talker_hidden_size=args.hidden_size, num_talker_hidden_layers=args.num_hidden_layers // 2,
                            use_moe=args.use_moe)
        return mo.MiniMindO(cfg)
    state = files.read_checkpoint(args.from_weight)
    model = mo.MiniMindO(files.checkpoint_config(args.from_weight, state))
    if any(k.startswith("talker.") for k in state):
        model.load_official_state_dict(state)
    else:
        start_from_text_model(model, state)
    if args.use_moe and not model.config.use_moe:
        raise ValueError(f"--use_moe, but {args.from_weight} holds a dense model; start from a MoE checkpoint "
                         "(sft_omni_768_moe.pth) or --from_weight none")
    return model


def start_from_text_model(model, state_dict):
    """Start from the text-only MiniMind (`llm_768.pth`: `model.*` and `lm_head.weight`).

    The Thinker loads strictly. When the widths match, Talker block i starts as a copy of Thinker
    block n_thinker - n_talker + i: the last Thinker blocks already know how to read the text."""
    other = [k for k in state_dict if not k.startswith("model.") and k != "lm_head.weight"]
    if other:
        raise ValueError(f"not a MiniMind checkpoint: it has {other[0]!r} and {len(other) - 1} more keys that are "
                         "neither model.* (the Thinker) nor talker.*")
    thinker = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    model.thinker.load_state_dict(thinker)
    if "lm_head.weight" in state_dict:  # tied to the embedding, so a checkpoint may leave it out
        with torch.no_grad():
            model.lm_head.weight.copy_(state_dict["lm_head.weight"])
    cfg = model.config
    if cfg.talker_hidden_size == cfg.hidden_size:
        offset = cfg.num_hidden_layers - cfg.num_talker_hidden_layers
        for i, block in enumerate(model.talker.layers):
            block.load_state_dict(model.thinker.layers[offset + i].state_dict())


def set_trainable(model, mode):
    """mode 'all' trains everything; 'audio_proj' / 'vision_proj' only that projector (the release
    aligns a new input this way before fine-tuning the whole model on it)."""
    only = {"all": None, "audio_proj": model.audio_proj, "vision_proj": model.vision_proj}[mode]
    for p in model.parameters():
        p.requires_grad_(only is None)
    if only is not None:
        only.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step, total, peak):
    """The release's cosine over optimizer steps 1..total: just under peak at the first, peak/10 at the last."""
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total, 1))))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class Learner:
    """The model and what trains it."""
    model: mo.MiniMindO              # its weights are what is saved
    net: torch.nn.Module             # what a step calls: the model, maybe in DDP
    params: list                     # the trainable parameters (--mode)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # loss scaling, enabled for float16 only
    autocast: object                 # the bf16/fp16 autocast context, or a null context (float32)


def build_learner(args, procs, resume):
    """The Learner, fresh (see build_model) or as the resume state left it, and the position to start
    from (resuming also restores the random states)."""
    model = build_model(args) if resume is None else resumed_model(resume)
    model.to(procs.device).train()
    model.thinker.checkpointing = model.talker.checkpointing = args.grad_checkpointing
    params = set_trainable(model, args.mode)
    dtype = getattr(torch, args.dtype)
    # fused: one kernel updates every parameter instead of a loop of small ones (several times faster on a CPU)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    autocast = torch.autocast(procs.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    learner = Learner(model, model, params, optimizer, scaler, autocast)
    if args.compile:  # the block stacks: their widths are few; the heads' are the batch's number of labels
        model.width_multiple = COMPILE_WIDTH
        thinker = model.thinker
        thinker.lower, thinker.upper = compiled(thinker.lower, args), compiled(thinker.upper, args)
        model.talker.forward = compiled(model.talker.forward, args)
    position = dict(epoch=0, batch=0, step=0, bad_rows=[], seconds=0.0)  # bad_rows: messages of skipped rows
    if resume is not None:
        position = restore(learner, resume, procs)
    if procs.world > 1:  # a T2A batch leaves the projectors unused, a MoE batch some experts: both are fine
        gpu = [procs.device.index] if procs.device.type == "cuda" else None
        learner.net = DistributedDataParallel(learner.net, device_ids=gpu, find_unused_parameters=True)
    return learner, position


def compiled(net, args):
    """--compile: torch.compile with static shapes, one graph per batch shape. Batch widths are multiples
    of COMPILE_WIDTH up to max_seq_len (see data.collate), batch sizes are --batch_size and the epoch's last,
    smaller batch: dynamo may keep that many graphs (its default limit, 8, would fall back to eager)."""
    widths = math.ceil(args.max_seq_len / COMPILE_WIDTH)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * widths)
    return torch.compile(net, dynamic=False)


# -----------------------------------------------------------------------------------------------
# 3. Checkpoints and exact resume
# -----------------------------------------------------------------------------------------------
# Two files: the weights in the release's fp16 layout (what chat.py and files.load_model read,
# and what the next stage starts from), and the resume state (fp32 weights, optimizer, scaler,
# position, random states). Both are written to a temporary file and renamed: a kill never leaves
# half a checkpoint behind.

RESUME_MUST_MATCH = ("data", "mode", "max_seq_len", "batch_size", "accumulation_steps", "epochs", "max_steps", "seed",
                     "learning_rate", "weight_decay", "grad_clip", "augment", "scheduled_sampling", "group_by_length")


def run_file(args, name):
    """<out_dir>/<save_weight>_<name>: where each file of this run goes."""
    return os.path.join(args.out_dir, f"{args.save_weight}_{name}")


def weight_path(args, cfg):
    return run_file(args, f"{cfg.hidden_size}{'_moe' if cfg.use_moe else ''}.pth")


def resume_path(args):
    return run_file(args, "resume.pt")


class OutputInUse(ValueError):
    """Another live run writes the same --out_dir/--save_weight files."""


@contextlib.contextmanager
def output_lock(args, procs):
    """Hold <out_dir>/<save_weight>.lock (rank 0) for the whole run: a second run on the same outputs
    would interleave their metrics and leave a checkpoint of neither, so it is refused at start. The
    lock is the kernel's (flock): it dies with its process, so a killed run's lock file is simply taken
    over. The file holds the owner's pid, for the message. Under the lock, temporary files that killed
    runs left beside this run's outputs are removed."""
    if not procs.is_main:
        yield
        return
    path = os.path.join(args.out_dir, f"{args.save_weight}.lock")
    f = take_lock(path)
    try:
        for leftover in glob.glob(os.path.join(glob.escape(args.out_dir), f".{glob.escape(args.save_weight)}_*.tmp*")):
            os.remove(leftover)  # files.atomic_path's temporary names: .<file>.<hex>.tmp<ext>
        yield
    finally:
        os.remove(path)  # while still holding it: a run that opened it meanwhile finds it locked, then gone
        f.close()


def take_lock(path):
    """The open, locked lock file at `path`, with this process's pid in it; OutputInUse when a live
    process holds it."""
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:
            raise write_failed(path, e, "Nothing was trained") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise OutputInUse(f"{path} is held by another training run (pid {owner}) writing the same --out_dir "
                              "and --save_weight; wait for it to finish, or choose another --save_weight or "
                              "--out_dir") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            break
        f.close()  # its owner removed it between our open and our lock: try again
    try:  # unbuffered: nothing is left to fail again when f closes
        os.ftruncate(f.fileno(), 0)
        os.write(f.fileno(), f"{os.getpid()}\n".encode())
    except OSError as e:
        os.remove(path)  # while holding it, as output_lock does
        f.close()
        raise write_failed(path, e, "Nothing was trained") from e
    return f


def rng_states(device):
    states = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if device.type == "cuda":  # this process's GPU only: touching the others would give each a context
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def save_resume_state(path, learner, position, args, procs):
    model = learner.model
    state = dict(model=model.state_dict(), config=asdict(model.config), optimizer=learner.optimizer.state_dict(),
                 scaler=learner.scaler.state_dict(), position=position, rng=rng_states(procs.device),
                 args={k: resume_setting(args, k) for k in RESUME_MUST_MATCH}, world=procs.world)
    with files.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume_state(path, args, world):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no resume state at {path} (it is written every --save_every steps "
                                "by a run with the same --out_dir and --save_weight)")
    try:  # our own file: RNG states are not tensors
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut short, overwritten: not torch.save's whole file
        raise ValueError(f"--resume: cannot read {path} ({(str(e).splitlines() or [''])[0][:120]}): it is damaged. "
                         "Start afresh without --resume (the weights of its last save are in "
                         f"{os.path.basename(path).replace('_resume.pt', '_<hidden>.pth')}, for --from_weight)") from e
    saved = lambda k: state["args"].get(k, False)  # a setting added since the file was written: it was off
    changed = [f"--{k} {saved(k)} -> {resume_setting(args, k)}" for k in RESUME_MUST_MATCH
               if saved(k) != resume_setting(args, k)]
    if state["world"] != world:
        changed.append(f"processes {state['world']} -> {world}")
    if changed:
        raise ValueError(f"--resume: {path} belongs to a different run ({'; '.join(changed)}); resume with the "
                         "original settings, or start afresh without --resume")
    return state


def resume_setting(args, name):
    """A setting as the resume state keeps it: the data files by what they are (real path and size), not
    by how the command spelled them (data.parquet, ./data.parquet, a link to it)."""
    if name == "data":
        return [f"{os.path.realpath(p)} ({os.path.getsize(p)} bytes)" for p in args.data]
    return getattr(args, name)


def resumed_model(resume):
    model = mo.MiniMindO(mo.OmniConfig(**resume["config"]))
    model.load_state_dict(resume["model"])
    return model


def restore(learner, resume, procs):
    """Put the optimizer, the loss scaler and the random states back as the resume state holds them;
    returns the position it was written at."""
    learner.optimizer.load_state_dict(resume["optimizer"])
    learner.scaler.load_state_dict(resume["scaler"])
    set_rng_states(resume["rng"], procs.device)
    # rank 0 keeps the run's skipped rows (see save()), the others collect afresh
    return dict(resume["position"], bad_rows=resume["position"]["bad_rows"] if procs.is_main else [])


def save(args, procs, learner, position, seconds):
    """Write the weights and the resume state (rank 0, with every process's skipped rows); returns how
    many rows were skipped. seconds(): the run's time so far."""
    bad_rows = procs.union(position["bad_rows"])
    if procs.is_main:
        path = weight_path(args, learner.model.config)
        try:
            files.save_checkpoint(learner.model, path)
            path = resume_path(args)
            save_resume_state(path, learner, dict(position, bad_rows=bad_rows, seconds=seconds()), args, procs)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise write_failed(path, e, "The previous file there is kept whole") from e
    return len(bad_rows)


class SaveFailed(OSError):
    """A file of the run could not be written (full disk, no permission); what was there before is intact."""


def write_failed(path, error, outcome):
    """The SaveFailed for `path`: the error's first line, the space left on its disk, and what became of the
    run (`outcome`, a sentence)."""
    folder = os.path.dirname(path) or "."
    free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free" if os.path.isdir(folder) else "no such folder"
    return SaveFailed(f"cannot write {path}: {(str(error).splitlines() or [''])[0]} ({free} on its disk: is it full, "
                      f"or not writable?). {outcome}")


# -----------------------------------------------------------------------------------------------
# 4. The training loop
# -----------------------------------------------------------------------------------------------

def batch_inputs(batch, encoders, mode):
    """What the model takes besides batch.input_ids: the frozen encoders' outputs and the labels.

    In --mode audio_proj / vision_proj the projector is all that trains, so it must take part in every
    step, even when a batch has nothing for it (no question audio, no image): otherwise the loss has no
    gradient to follow. It is given a zero-length question or a zero image, which injects nothing (the
    batch has no placeholder for it). In --mode all an idle projector simply gets no gradient, as in
    the release."""
    audio, image = data.encode_inputs(batch, encoders)  # (B, L, 512), (B, 64, 768) or None
    B, device = len(batch.input_ids), batch.input_ids.device
    lengths = batch.speech_lengths
    if audio is None and mode == "audio_proj":
        audio = torch.zeros(B, 1, mo.SPEECH_EMBED_DIM, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
    if image is None and mode == "vision_proj":
        image = torch.zeros(B, mo.IMAGE_TOKENS, mo.IMAGE_EMBED_DIM, device=device)
    return dict(audio_embeds=audio, audio_lengths=lengths, image_embeds=image, spk_emb=batch.spk_emb,
                text_labels=batch.text_labels, audio_labels=batch.audio_labels)


def epoch_batches(dataset, args, procs, position, lengths=None):
    """This process's batches of the position's epoch, from its batch on, on the device. lengths:
    data.estimated_lengths, to group the rows by (--group_by_length)."""
    dataset.epoch = position["epoch"]  # before the DataLoader starts its workers
    sampler = data.EpochBatches(len(dataset), args.batch_size, args.seed, position["epoch"], procs.rank,
                                procs.world, position["batch"], lengths)
    collate = functools.partial(data.collate, width_multiple=COMPILE_WIDTH if args.compile else 1)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, collate_fn=collate,
                             pin_memory=procs.device.type == "cuda"))
    return (skipped_reported(batch, position).to(procs.device) for batch in loader)


def skipped_reported(batch, position):
    """The batch, once the rows it skipped (--skip_bad_rows) are reported, each once, and kept in
    position["bad_rows"]."""
    for message in batch.bad_rows:  # every process reports its own, once (not again each epoch)
        if message not in position["bad_rows"]:
            tqdm.write(f"skipped bad row: {message}")
            position["bad_rows"].append(message)
    return batch


class MetricsLog:
    """One JSON line per logged step; on resume, lines after the resumed step are dropped (they
    will be written again)."""

    def __init__(self, path, resume_step=None):
        self.path = path
        kept = []
        if resume_step is not None and os.path.exists(path):
            kept = [line for line in self.lines() if json.loads(line)["step"] <= resume_step]
        try:
            with files.atomic_path(path) as tmp, open(tmp, "w") as f:
                f.writelines(kept)
        except OSError as e:
            raise write_failed(path, e, "Nothing was trained") from e

    def lines(self):
        """The file's whole lines. A kill mid-write can leave the last one cut off: it is dropped (that step
        is written again); any other line that is not JSON is an error naming the file and line."""
        with open(self.path) as f:
            lines = f.readlines()
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)["step"]
            except (json.JSONDecodeError, TypeError, KeyError):
                if number == len(lines) and not line.endswith("\n"):
                    return lines[:-1]
                raise ValueError(f"{self.path}, line {number}: not a metrics record ({line.strip()[:80]!r})") from None
        return lines

    def write(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # the lines before stay: each was written whole, closed, on its own
            raise write_failed(self.path, e, "Its lines before this step are kept") from e

    def records(self):
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def plot(self, png, title):
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        records = self.records()
        if not records:
            return None
        steps = [r["step"] for r in records]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key in ("loss", "text", "audio"):
            ax.plot(steps, [r[key] for r in records], label=key)
        ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with files.atomic_path(png) as tmp:  # the format follows the extension, which tmp keeps
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        return png


class Progress:
    """The run's clock, and on rank 0 its progress bar and metrics file."""

    def __init__(self, args, procs, position, total_steps, resuming):
        self.procs = procs
        metrics = run_file(args, "metrics.jsonl")
        self.log = MetricsLog(metrics, position["step"] if resuming else None) if procs.is_main else None
        self.bar = tqdm(total=total_steps, initial=position["step"], disable=not procs.is_main, dynamic_ncols=True,
                        unit="step", mininterval=0)  # drawn after every step, however short (tqdm's default: 0.1 s)
        self.started = time.time() - position["seconds"]

    def seconds(self):
        return time.time() - self.started

    def record(self, sums, position, lr, tick):
        """One metrics line and the bar's numbers, from a step's (7,) sums (see train_loop) of every
        process; tick: when the step began."""
        sums = self.procs.sum(sums)
        loss, text, audio, aux = (sums[:4] / self.procs.world).tolist()
        seconds = time.time() - tick
        if self.procs.is_main:
            self.log.write(dict(step=position["step"], epoch=position["epoch"], loss=loss, text=text, audio=audio,
                                aux=aux, lr=lr, samples_per_s=sums[5].item() / seconds,
                                tokens_per_s=sums[4].item() / seconds, padding=1 - sums[4].item() / sums[6].item(),
                                elapsed_s=self.seconds()))
            self.bar.set_postfix(loss=f"{loss:.3f}", text=f"{text:.3f}", audio=f"{audio:.3f}", lr=f"{lr:.2e}",
                                 refresh=False)  # the step's update() draws the bar: once a step


def tokenizer_folder(args):
    """--tokenizer, else the --from_weight folder (release folders ship it), else TOKENIZER.place, fetched
    there (about 450 KB) when it is missing and the hub can be reached."""
    if args.tokenizer:
        return args.tokenizer
    start = getattr(args, "from_weight", None)
    if start and os.path.isfile(os.path.join(start, "tokenizer.json")):
        return start
    folder = os.path.join(HERE, TOKENIZER.place)
    for failure in files.download(argparse.Namespace(tokenizer=folder), ["tokenizer"]):
        tqdm.write(failure)  # offline, refused, cut off: the error below says how to get it by hand
    if not TOKENIZER.present(folder):
        raise FileNotFoundError(f"no tokenizer in {folder}: training needs the released MiniMind tokenizer. Get it "
                                f"with\n  {TOKENIZER.download[0]}\nor point --tokenizer at a folder that has tokenizer.json")
    return folder


def published_weights(path):
    """How to get a published .pth (llm_768.pth, sft_omni_768.pth ...) to `path`, or the release folder."""
    if not path.endswith(".pth"):
        return files.PARTS["checkpoint"].how
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    return (f"`modelscope download --model gongjy/minimind-3o-pytorch {name} --local_dir {folder}` or "
            f"`hf download jingyaogong/minimind-3o-pytorch {name} --local-dir {folder}`")


def missing_inputs(args):
    """Every input file that is not there (tokenizer, data, start weights), as one message, or None: a
    first run learns all it has to download at once, not one file per attempt."""
    missing = []
    try:
        tokenizer_folder(args)
    except FileNotFoundError as e:
        missing.append(str(e))
    missing += [f"data file not found: {p} ({data.PUBLISHED_DATA})" for p in args.data if not os.path.exists(p)]
    if args.from_weight != "none" and not args.resume and files.weights_file(args.from_weight) is None:
        missing.append(f"--from_weight {args.from_weight} not found; get the published weights with "
                       f"{published_weights(args.from_weight)}")
    return "\n".join(missing) or None


def prepare_data(args, procs):
    """The data.OmniDataset of --data: every input file checked first, then the rows, the encoders they need
    and (--encoder_cache) their caches."""
    missing = missing_inputs(args)
    if missing:
        raise FileNotFoundError(missing)
    tok = mo.load_tokenizer(tokenizer_folder(args))
    rows = data.ParquetRows(args.data)
    if len(rows) < procs.world:
        raise ValueError(f"{len(rows)} rows cannot be shared by {procs.world} processes")
    needs = {"audio_proj": "question_audios", "vision_proj": "image_bytes"}.get(args.mode)
    if needs and not rows.has_any(needs):
        raise ValueError(f"--mode {args.mode} trains only that projector, but no row of {args.data} has {needs}")
    encoders = data.load_encoders(rows, args, procs.device)
    if args.encoder_cache:
        procs.say(data.open_caches(encoders, args))
    return data.OmniDataset(rows, tok, args.max_seq_len, encoders, args.augment, args.scheduled_sampling,
                            args.seed, args.skip_bad_rows)


def demo_data(args, procs):
    """The demo's parquet file in --out_dir: rank 0 writes it, the others wait for it."""
    path = os.path.join(args.out_dir, "demo_t2a.parquet")
    if procs.is_main:
        data.write_demo_data(path)
    if procs.world > 1:
        dist.barrier()
    return path


@dataclass
class Processes:
    """This process's place in the run: its rank of `world` processes (1 without torchrun), its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    def say(self, line):
        if self.is_main:
            tqdm.write(line)

    def sum(self, t):
        """t summed over the processes, on the device (NCCL reduces CUDA tensors only); returned on the CPU."""
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def union(self, items):
        """Every process's items, each once (rank 0's resume state keeps the union)."""
        if self.world == 1:
            return items
        gathered = [None] * self.world
        dist.all_gather_object(gathered, items)
        return sorted(set().union(*gathered))


def check_device(args):
    """--device names a device PyTorch has here and --dtype a precision it trains in (ValueError naming
    the flag otherwise); an unset --dtype becomes the device's default."""
    name = args.device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cuda, cuda:N, mps or cpu") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: train.py runs on cuda, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ValueError(f"--device {name}: PyTorch sees no CUDA GPU here (this PyTorch is {build}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there is no such GPU (PyTorch sees {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = "this PyTorch is built without MPS" if not torch.backends.mps.is_built() else "no Apple-silicon GPU"
        raise ValueError(f"--device {name}: MPS (an Apple-silicon Mac's GPU) is not available here ({why}); use "
                         "--device cpu")
    if device.type == "mps" and "RANK" in os.environ:
        raise ValueError(f"--device {name}: MPS trains in one process; under torchrun use --device cuda or cpu")
    if device.type == "cpu" and args.dtype == "float16":
        raise ValueError("--dtype float16: float16 training needs a GPU (CUDA or MPS); on the CPU use --dtype bfloat16 "
                         "or float32")
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")


def setup_processes(args):
    """Under torchrun each process joins the group and takes its own GPU."""
    if "RANK" not in os.environ:
        return Processes(0, 1, torch.device(args.device))
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def describe(learner, dataset, total_steps, args, procs):
    counts = mo.parameter_counts(learner.model)
    return (f"model: {counts['total']:.2f}M parameters (Thinker {counts['thinker']:.2f}M, Talker "
            f"{counts['talker']:.2f}M), training {sum(p.numel() for p in learner.params) / 1e6:.2f}M ({args.mode}); "
            f"data: {len(dataset)} rows in {len(args.data)} file(s); {total_steps} steps of "
            f"{args.batch_size}x{args.accumulation_steps}x{procs.world} samples on {procs.device}")


def train(args):
    """Run one training stage; returns a summary dict (also printed)."""
    procs = setup_processes(args)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise write_failed(args.out_dir, e, "Nothing was trained") from e
    with output_lock(args, procs):
        return train_stage(args, procs)


def train_stage(args, procs):
    """train() once this run holds its outputs."""
    demo = args.data is None
    if demo:
        tokenizer_folder(args)  # checked (fetched when possible) before the demo's data is written
        args.data = [demo_data(args, procs)]
    dataset = prepare_data(args, procs)
    n_batches = data.batches_per_epoch(len(dataset), args.batch_size, procs.world)
    total_steps = min(math.ceil(n_batches / args.accumulation_steps) * args.epochs, args.max_steps or math.inf)
    resume = load_resume_state(resume_path(args), args, procs.world) if args.resume else None
    learner, position = build_learner(args, procs, resume)
    procs.say(describe(learner, dataset, total_steps, args, procs)
              + (f"; resuming after step {position['step']}" if resume else ""))
    if position["step"] >= total_steps:
        procs.say(f"--resume: this run already finished all {total_steps} steps; nothing left to train")
    progress = Progress(args, procs, position, total_steps, resume is not None)
    train_loop(learner, dataset, position, total_steps, progress, args, procs)
    return finish(args, procs, learner, position, progress, demo)


def train_loop(learner, dataset, position, total_steps, progress, args, procs):
    """The training loop, from `position` (epoch, batch, step) on. Each optimizer step: the lr of the
    schedule; accumulation_steps micro-batches, each a forward pass with labels (the model returns its
    losses) and a backward pass, their gradients summed; clipping; the update. Then its metrics, and the
    save every --save_every steps (the last one is finish's)."""
    net, optimizer, scaler = learner.net, learner.optimizer, learner.scaler
    n_batches = data.batches_per_epoch(len(dataset), args.batch_size, procs.world)
    lengths = length_groups(dataset, args, procs) if args.group_by_length else None
    while position["epoch"] < args.epochs and position["step"] < total_steps:
        batches = epoch_batches(dataset, args, procs, position, lengths)
        while position["batch"] < n_batches and position["step"] < total_steps:
            step, tick = position["step"] + 1, time.time()
            lr = set_lr(optimizer, lr_at(step, total_steps, args.learning_rate))
            group_size = min(args.accumulation_steps, n_batches - position["batch"])
            sums = torch.zeros(7)  # loss, text, audio, aux (means over the micro-batches), tokens, samples, positions
            with out_of_memory_said(args, procs, step):
                for i in range(group_size):
                    batch = next(batches)
                    last = i == group_size - 1  # DDP averages gradients only after the last micro-batch
                    with contextlib.nullcontext() if last or procs.world == 1 else net.no_sync():
                        with learner.autocast:
                            losses = net(batch.input_ids, **batch_inputs(batch, dataset.encoders, args.mode))
                            loss = sum(losses)  # text + audio + MoE load balance
                        scaler.scale(loss / group_size).backward()
                    sizes = torch.tensor([batch.tokens, len(batch.input_ids), batch.text_labels.numel()])
                    sums += torch.cat([torch.stack([loss, *losses]).detach().float().cpu() / group_size, sizes])
            if not torch.isfinite(sums[0]):
                raise NotFinite(step, "loss")
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(learner.params, args.grad_clip)
            if not scaler.is_enabled() and not torch.isfinite(norm):  # float16's scaler skips such a step itself
                raise NotFinite(step, "gradient norm")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            position.update(batch=position["batch"] + group_size, step=step)
            if step == 1 or step % args.log_every == 0 or step == total_steps:  # the report compares first and last
                progress.record(sums, position, lr, tick)
            progress.bar.update(1)
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save(args, procs, learner, position, progress.seconds)
        if position["batch"] >= n_batches:
            position.update(epoch=position["epoch"] + 1, batch=0)


def length_groups(dataset, args, procs):
    """--group_by_length: every row's estimated length (each process computes the same)."""
    started = time.time()
    lengths = data.estimated_lengths(dataset.rows, dataset.tok, args.max_seq_len)
    procs.say(f"--group_by_length: estimated the length of {len(lengths)} rows in {time.time() - started:.1f} s "
              f"(median {int(lengths.median())} tokens)")
    return lengths


class NotFinite(ValueError):
    """A step whose loss or gradients are not numbers: it is not taken, and the run stops before its next
    save, so the weights on disk stay those of the last good one."""

    def __init__(self, step, what):
        super().__init__(f"step {step}: the {what} is not a number (NaN or infinite); it was not taken and training "
                         "stopped, so the saved weights are those of the last save before it")


class OutOfMemory(RuntimeError):
    """A training step did not fit in the device's memory; the message names settings that need less."""


@contextlib.contextmanager
def out_of_memory_said(args, procs, step):
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(memory_advice(e, args, procs, step)) from None


def memory_advice(error, args, procs, step):
    """What ran out (the first two sentences of PyTorch's message), and the settings that need less memory."""
    said = ". ".join(str(error).split(". ")[:2]).strip().rstrip(".")
    settings = f"--batch_size {args.batch_size} --accumulation_steps {args.accumulation_steps} --max_seq_len " \
               f"{args.max_seq_len} --dtype {args.dtype}" + (" --grad_checkpointing" if args.grad_checkpointing else "")
    fits = []
    if args.batch_size > 1:  # the largest micro-batch of at most half as many that divides the batch
        half = max(d for d in range(1, args.batch_size // 2 + 1) if args.batch_size % d == 0)
        fits.append(f"--batch_size {half} --accumulation_steps {args.accumulation_steps * args.batch_size // half} "
                    f"(the same {args.batch_size * args.accumulation_steps} samples per optimizer step, so much the "
                    "same training, in more and smaller micro-batches)")
    if not args.grad_checkpointing:
        fits.append("--grad_checkpointing (the same training: each block is recomputed in the backward pass, "
                    "at most one more forward pass of the blocks)")
    if args.dtype == "float32" and procs.device.type != "cpu":
        fits.append("--dtype bfloat16 (about 30% less activation memory)")
    fits.append(f"--max_seq_len {max(MIN_SEQ_LEN, args.max_seq_len // 2)} (longer conversations are cut)")
    return (f"out of {procs.device.type} memory in step {step} ({said}) with {settings}. Each of these needs less: "
            + "; ".join(fits) + ". docs/performance.md, 'Memory', has a table of what fits in 8, 12, 16 and 24 GB")


def finish(args, procs, learner, position, progress, demo):
    """The last save, then on rank 0 the loss plot and the report; returns the summary."""
    progress.bar.close()
    summary = dict(steps=position["step"], seconds=progress.seconds(),
                   bad_rows=save(args, procs, learner, position, progress.seconds),
                   checkpoint=weight_path(args, learner.model.config), resume_state=resume_path(args))
    if procs.is_main:
        log = progress.log
        records = log.records()
        summary.update(first_loss=records[0]["loss"], last_loss=records[-1]["loss"], metrics=log.path,
                       padding=float(np.mean([r["padding"] for r in records])),
                       plot=log.plot(run_file(args, "loss.png"), plot_title(args, learner.model.config, demo)))
        report(summary, args, demo)
    if procs.world > 1:
        dist.destroy_process_group()
    return summary


def plot_title(args, cfg, demo):
    """What run the loss plot is of; the demo's says that its "audio" loss is made-up codes learned by heart."""
    data = "the demo's colour and sum questions" if demo else ", ".join(os.path.basename(p) for p in args.data)
    title = f"{args.save_weight}: {cfg.hidden_size}-wide model, --mode {args.mode}, on {data}"
    if demo:
        title += '\n"audio" is memorising made-up codes (one per character), not learning speech'
    return title


def report(summary, args, demo):
    lines = [f"trained {summary['steps']} steps in {summary['seconds']:.0f} s: loss {summary['first_loss']:.3f} -> "
             f"{summary['last_loss']:.3f}; {summary['padding']:.0%} of the positions computed were padding (logged steps)",
             f"weights:      {summary['checkpoint']}   (what files.load_model and chat.py --checkpoint read)",
             f"resume state: {summary['resume_state']}   (add --resume to the same command to continue)",
             f"metrics:      {summary['metrics']}, plot {summary['plot']}"]
    if summary["bad_rows"]:
        lines.append(f"skipped {summary['bad_rows']} bad rows (listed above)")
    if demo:
        lines = [f"demo: wrote {args.data[0]} ({data.DEMO_ROWS} T2A rows in the release's schema) and trained a "
                 f"{args.hidden_size}-wide model on it from random weights."] + lines + [
            "it was taught six colour questions, " + ", ".join(f'"What colour is the {thing}?"'
                                                              for thing in sorted(data.DEMO_COLOURS))
            + ', and sums of two digits ("What is 3 plus 4?").',
            "next: ask it what it was taught. It gets the colours right; sums come out in the right form but "
            "mostly wrong (a tiny model learns the format in minutes, not arithmetic). Its 'speech' is "
            "made-up codes, so ask for text only:",
            f'  python chat.py --checkpoint {summary["checkpoint"]} --tokenizer {tokenizer_folder(args)} --no_speech '
            '--greedy --text "What colour is the sky?"',
            "then train the real model: download llm_768.pth and sft_t2a_mini.parquet (README.md, 'Training "
            "recipes', has the commands) and run the mini recipe, starting with",
            "  python train.py --data dataset/sft_t2a_mini.parquet --from_weight out/llm_768.pth "
            "--save_weight sft_zero --batch_size 40 --max_seq_len 512"]
    tqdm.write("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    check_device(args)
    return data.prepare(args) if args.prepare else train(args)


if __name__ == "__main__":
    try:  # one line, not a traceback, for missing files, bad data or arguments, a full disk, a step too big
        main()
    except (FileNotFoundError, SaveFailed, ValueError, OutOfMemory) as e:
        sys.exit(f"train.py: {e}")
