"""
What do train.py's options buy? train.py's own training step (forward, backward, clipping, AdamW) of the
full-size model with random weights, on synthetic rows of realistic length read by train.py's dataset
(benchmarks/common.py), the variants taking turns step by step:

    python benchmarks/bench_train.py                     # each batch cut after its longest sample vs padded to max_len
    python benchmarks/bench_train.py --device cuda --batch_size 40 --max_seq_len 512    # the release's shapes
    python benchmarks/bench_train.py --grad_checkpointing                 # with and without --grad_checkpointing
    python benchmarks/bench_train.py --group_by_length --batch_size 4 --max_seq_len 512
    python benchmarks/bench_train.py --encoder_cache [--mode audio_proj]  # spoken rows and images, full-size encoders
    python benchmarks/bench_train.py --memory            # the estimated peak GPU memory table, without a GPU

Reports each variant's median step after warm-up (--group_by_length: the mean, over the first batches of an
epoch in the release's order and grouped) and its samples/s against the first variant's.
"""
import argparse
import contextlib
import os
import tempfile
import time
from dataclasses import replace

import common
import numpy as np
import torch

import data
import files
import minimind_o as mo
import train

EPOCH_ROWS = 1024                 # --group_by_length: the epoch whose padding is counted


def rows_dataset(tmp, tok, n, max_len, spoken=False, encoders=None):
    """n synthetic rows written to a parquet file and read by train.py's dataset."""
    rows = data.ParquetRows([common.write_rows(os.path.join(tmp, f"rows_{n}_{spoken}.parquet"), n, spoken)])
    return rows, data.OmniDataset(rows, tok, max_len, encoders, augment="none", skip_bad_rows=True)


def steps_on(learner, args, batches, encoders=None):
    """A variant for common.take_turns: train.py's step on batches[i]."""
    return lambda i: common.train_step(learner, args, batches[i], encoders)


# -----------------------------------------------------------------------------------------------
# The comparisons: each prints what it compares and returns its variants, the first the baseline
# -----------------------------------------------------------------------------------------------

def padding(learner, args, tok, tmp, batch_size, rounds):
    """Each batch cut after its longest sample (train.py's collate) against padded to max_len (the release)."""
    dataset = rows_dataset(tmp, tok, batch_size * rounds, args.max_seq_len)[1]
    groups = [[dataset[i] for i in range(k, k + batch_size)] for k in range(0, len(dataset), batch_size)]
    longest = [data.collate(g).to(args.device) for g in groups]
    lengths = np.array([s.length for g in groups for s in g])
    print(f"sample lengths: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()} (of "
          f"{args.max_seq_len - 1}); mean batch width when padded to the longest: "
          f"{np.mean([b.input_ids.shape[-1] for b in longest]):.0f}; {lengths.sum() / len(groups):.0f} tokens a batch")
    full = [data.collate([replace(s, length=args.max_seq_len - 1) for s in g]).to(args.device) for g in groups]
    return {"padded to max_len": steps_on(learner, args, full), "padded to longest": steps_on(learner, args, longest)}


def grad_checkpointing(learner, args, tok, tmp, batch_size, rounds):
    """The same batches without and with --grad_checkpointing."""
    dataset = rows_dataset(tmp, tok, batch_size * rounds, args.max_seq_len)[1]
    batches = [data.collate([dataset[i] for i in range(k, k + batch_size)]).to(args.device)
               for k in range(0, len(dataset), batch_size)]

    def step(on):
        def run(i):
            learner.model.thinker.checkpointing = learner.model.talker.checkpointing = on
            common.train_step(learner, args, batches[i])
        return run
    return {"without": step(False), "with --grad_checkpointing": step(True)}


def group_by_length(learner, args, tok, tmp, batch_size, rounds):
    """An epoch of T2A rows in the release's order and grouped by estimated length: its padding share, and
    the first batches of each to time (a mean over them weighs their widths as the epoch does)."""
    rows, dataset = rows_dataset(tmp, tok, EPOCH_ROWS, args.max_seq_len)
    started = time.perf_counter()
    estimates = data.estimated_lengths(rows, tok, args.max_seq_len)
    estimate_s = time.perf_counter() - started
    lengths = torch.tensor([dataset[i].length for i in range(len(rows))])
    orders = {"release order": data.EpochBatches(len(rows), batch_size, seed=0, epoch=0),
              "grouped": data.EpochBatches(len(rows), batch_size, seed=0, epoch=0, lengths=estimates)}
    shares = {name: 1 - lengths.sum().item() / sum(len(b) * lengths[b].max().item() for b in order.batches)
              for name, order in orders.items()}
    print(f"{EPOCH_ROWS} T2A rows, sample lengths: median {int(lengths.median())}, max {int(lengths.max())} (of "
          f"{args.max_seq_len - 1}); estimated in {estimate_s:.2f} s, the estimate {np.corrcoef(estimates, lengths)[0, 1]:.2f} "
          "correlated with the true lengths; padding share of the epoch: "
          + ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))
    batches = {name: [data.collate([dataset[i] for i in b.tolist()]).to(args.device) for b in order.batches[:rounds]]
               for name, order in orders.items()}
    for name, timed in batches.items():
        print(f"  {name}: batches of widths {[b.input_ids.shape[-1] for b in timed]}")
    return {name: steps_on(learner, args, b) for name, b in batches.items()}


def encoder_cache(learner, args, tok, tmp, batch_size, rounds):
    """A2A rows from the file to the AdamW update, through the full-size frozen encoders: no cache, the
    first epoch (encoding and writing the cache) and a warm cache (read back), each on its own rows."""
    import side_assets
    speech_folder = side_assets.build_sensevoice(tmp, side_assets.FULL_SENSEVOICE)
    vision_folder = side_assets.build_siglip(tmp, side_assets.FULL_SIGLIP)
    speech = files.load_speech_encoder(speech_folder, args.device)
    vision, processor = files.load_vision_encoder(vision_folder, args.device)

    def cached(cache):
        encoders = data.Encoders(speech, speech.frontend, vision, processor)
        if cache:
            encoders.speech_cache = data.EncoderCache(os.path.join(tmp, cache), "speech", speech_folder)
            encoders.image_cache = data.EncoderCache(os.path.join(tmp, cache), "image", vision_folder)
        return rows_dataset(tmp, tok, batch_size * rounds, args.max_seq_len, True, encoders)[1]

    variants = {"no cache": cached(None), "first epoch": cached("first"), "warm cache": cached("warm")}
    batch = lambda rows, i: data.collate([rows[r] for r in range(i * batch_size, (i + 1) * batch_size)]).to(args.device)
    warm = variants["warm cache"]
    for i in range(rounds):  # an earlier epoch fills the warm cache
        data.encode_inputs(batch(warm, i), warm.encoders)
    millions = lambda module: sum(p.numel() for p in module.parameters()) / 1e6
    print(f"SenseVoiceSmall {millions(speech):.0f}M and SigLIP2 {millions(vision):.0f}M parameters; an image in "
          f"every {common.IMAGE_EVERY} rows")
    return {name: lambda i, dataset=dataset: common.train_step(learner, args, batch(dataset, i), dataset.encoders)
            for name, dataset in variants.items()}


def compare(variants, args, batch_size, warmup, steps, average=np.median):
    """Time the variants taking turns; one line each, and its speed against the first's."""
    times = common.take_turns(variants, steps, warmup, args.device)
    seconds = {name: float(average(t)) for name, t in times.items()}
    first = next(iter(seconds))
    for name, s in seconds.items():
        print(f"  {name:26s} {s * 1000:8.1f} ms/step  {batch_size / s:8.2f} samples/s  "
              f"{seconds[first] / s:.2f}x the samples/s of {first}")


# -----------------------------------------------------------------------------------------------
# --memory: the estimated peak GPU memory of a training step
# -----------------------------------------------------------------------------------------------
# Per (dtype, checkpointing, max_seq_len): 16 bytes a parameter for the weights, gradients and AdamW's moments
# (+2 for bfloat16 autocast's weight copies), and per sample what the forward pass saves for the backward pass
# (saved_tensors_hooks, each storage once; batch 2 less batch 1, every sample max_seq_len long with a text
# label at its end: no block stops early), plus twice its share of the largest saved tensor and, with
# checkpointing, one block's recomputed activations. The CPU's autocast and flash attention stand in for
# CUDA's; the CUDA context and fragmentation are left out ('fits' leaves USABLE_MARGIN_GIB for them).

MEMORY_BATCHES = (4, 8, 16, 32, 40)
MEMORY_LENS = (256, 512)
GPU_SIZES = (8, 12, 16, 24)
USABLE_MARGIN_GIB = 1.0


def widest(sample, length):
    """The sample as the widest there is: `length` positions, the last with a text label."""
    text_labels = sample.text_labels.clone()
    text_labels[length - 1] = sample.input_ids[mo.TEXT_ROW, length - 1]
    return replace(sample, length=length, text_labels=text_labels)


def saved_bytes(learner, batch, autocast):
    """(every byte saved for backward, the largest saved tensor's bytes per sample) of one step on `batch`."""
    storages, largest = {}, 0

    def pack(t):
        nonlocal largest
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        if t.dim() and t.shape[0] == len(batch.input_ids):
            largest = max(largest, t.numel() * t.element_size() // len(batch.input_ids))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            losses = learner.net(batch.input_ids, **train.batch_inputs(batch, data.Encoders(), "all"))
        sum(losses).backward()
    learner.model.zero_grad(set_to_none=True)
    return sum(storages.values()), largest


def estimate_memory(learner, tok, tmp, device):
    """{(dtype, checkpointing, max_seq_len): (bytes for the model, bytes per sample)}."""
    model = learner.model
    params = sum(p.numel() for p in model.parameters())
    blocks = len(model.thinker.layers) + len(model.talker.layers)
    table = {}
    for dtype in ("bfloat16", "float32"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
        for max_len in MEMORY_LENS:
            dataset = rows_dataset(tmp, tok, 2, max_len)[1]
            samples = [widest(dataset[i], max_len - 1) for i in range(2)]
            one, two = data.collate(samples[:1]).to(device), data.collate(samples).to(device)
            per_sample = {}
            for checkpointing in (False, True):
                model.thinker.checkpointing = model.talker.checkpointing = checkpointing
                (at_one, _), (at_two, largest) = saved_bytes(learner, one, autocast), saved_bytes(learner, two, autocast)
                per_sample[checkpointing] = (at_two - at_one, largest)
            one_block = (per_sample[False][0] - per_sample[True][0]) / blocks
            for checkpointing, (activations, largest) in per_sample.items():
                table[dtype, checkpointing, max_len] = (params * (16 + 2 * (dtype == "bfloat16")),
                                                        activations + 2 * largest + one_block * checkpointing)
    return params, table


def report_memory(learner, tok, tmp, device):
    """docs/performance.md's memory table: estimated peak GiB per setting, and the largest batch each GPU fits."""
    params, table = estimate_memory(learner, tok, tmp, device)
    print(f"ESTIMATED peak memory of one training step (GiB), full-size dense model ({params / 1e6:.0f}M parameters), "
          f"every sample max_seq_len long; not measured on a GPU; 'fits' leaves {USABLE_MARGIN_GIB:g} GiB of the GPU "
          "for the CUDA context")
    print("| --dtype | --grad_checkpointing | --max_seq_len | " + " | ".join(f"batch {b}" for b in MEMORY_BATCHES)
          + " | " + " | ".join(f"fits {g} GB" for g in GPU_SIZES) + " |")
    print("|---" * (3 + len(MEMORY_BATCHES) + len(GPU_SIZES)) + "|")
    for (dtype, checkpointing, max_len), (static, per_sample) in table.items():
        gib = [(static + per_sample * b) / 2**30 for b in MEMORY_BATCHES]
        fits = [max(0, int(((g - USABLE_MARGIN_GIB) * 2**30 - static) // per_sample)) for g in GPU_SIZES]
        print(f"| {dtype} | {'on' if checkpointing else 'off'} | {max_len} | " + " | ".join(f"{x:.1f}" for x in gib)
              + " | " + " | ".join(f"batch {f}" for f in fits) + " |")


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch_size", type=int, help="samples per step (default 40 on cuda, 2 on cpu)")
    p.add_argument("--max_seq_len", type=int, help="sample length (default 512 on cuda, 256 on cpu)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 10 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3 on cuda, 1 on cpu)")
    p.add_argument("--mode", choices=["all", "audio_proj", "vision_proj"], default="all",
                   help="what is trained, as train.py --mode (default all)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: $MINIMIND_TOKENIZER, else as train.py finds it)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--group_by_length", action="store_true",
                      help="compare the release's batch order with train.py --group_by_length on T2A rows")
    what.add_argument("--grad_checkpointing", action="store_true",
                      help="time the step with and without train.py --grad_checkpointing")
    what.add_argument("--encoder_cache", action="store_true",
                      help="time A2A rows through the full-size frozen encoders without, filling and reading "
                           "train.py's --encoder_cache")
    what.add_argument("--memory", action="store_true",
                      help="estimate peak GPU memory per setting (docs/performance.md's memory table) instead of timing")
    args = p.parse_args()
    on_gpu = args.device.startswith("cuda")
    batch_size, max_len = args.batch_size or (40 if on_gpu else 2), args.max_seq_len or (512 if on_gpu else 256)
    steps, warmup = args.steps or (10 if on_gpu else 3), args.warmup or (3 if on_gpu else 1)
    tok = mo.load_tokenizer(common.tokenizer_folder(args.tokenizer))
    learner, train_args = common.learner(args.device, batch_size, max_len, ["--mode", args.mode])
    name = torch.cuda.get_device_name(args.device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"dense model {mo.parameter_counts(learner.model)['total']:.2f}M on {name}; batch {batch_size}, max_seq_len "
          f"{max_len}, --dtype {train_args.dtype}, --mode {args.mode}; {warmup} warm-up + {steps} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            return report_memory(learner, tok, tmp, torch.device(args.device))
        mode = next((m for m in (grad_checkpointing, group_by_length, encoder_cache) if getattr(args, m.__name__)), padding)
        variants = mode(learner, train_args, tok, tmp, batch_size, warmup + steps)
        compare(variants, train_args, batch_size, warmup, steps, np.mean if mode is group_by_length else np.median)


if __name__ == "__main__":
    main()
