"""
How much does padding each batch only to its longest sample buy? One training step (forward,
backward, clipping, AdamW) of the full-size model, on the same synthetic T2A samples, two ways:

    longest   the batch is cut after its longest sample (what train.py does)
    max_len   every sample is padded to max_len (what the release does)

    python benchmarks/bench_train.py                                                  # CPU, small shapes
    python benchmarks/bench_train.py --device cuda --batch_size 40 --max_seq_len 512  # the release's shapes

With --encoder_cache it asks instead what train.py --encoder_cache buys: the same step on synthetic
A2A rows (a spoken question, every second row an image) read and batched by train.py's dataset,
then encoded by full-size SenseVoiceSmall and SigLIP2 (random weights, the published shapes), three ways:

    no cache      every epoch: decode, fbank, preprocess, both encoders (what train.py does by default)
    first epoch   the same, and the outputs are written to the cache
    warm cache    later epochs and stages: the outputs are read back; no decoding, no encoders

    python benchmarks/bench_train.py --encoder_cache                                  # CPU, batch 2
    python benchmarks/bench_train.py --encoder_cache --mode audio_proj                # the first A2A stage

With --group_by_length it asks what train.py --group_by_length buys: the same step on T2A rows in the
release's schema (a parquet file of realistic lengths, read by train.py's dataset), batched in the
release's seeded order and grouped by estimated length; the padding share of a whole epoch, and the
samples/s of the first batches of each order.

    python benchmarks/bench_train.py --group_by_length --batch_size 4 --max_seq_len 512

With --grad_checkpointing it times the step with and without train.py --grad_checkpointing.
With --memory it estimates the peak GPU memory of a training step per batch size, max_seq_len,
--grad_checkpointing and --dtype, without a GPU (see estimate_memory): docs/performance.md's memory table.

Random weights; samples are built by minimind_o.build_sample from made-up English questions and
replies whose speech lasts a log-normal number of seconds (median 8 s, as in spoken-assistant data),
so lengths vary the way real T2A batches do. A spoken question lasts its word count at the speaking
rate (1.6 to 12 s): the committed espeak-ng clip repeated to that length. Reports samples/s and
tokens/s (tokens = positions up to each sample's last label: the same useful work in both rows): the
median step after warm-up, the variants taking turns, with the GPU synchronised around every timed step.
"""
import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import minimind_o as mo  # noqa: E402
import files  # noqa: E402
import train  # noqa: E402

WORDS = ("the quick answer is that light travels fast while sound moves more slowly through air water and stone "
         "so we see lightning before we hear thunder and this simple idea helps people estimate distance").split()
SPEECH_MEDIAN_S, SPEECH_SIGMA = 8.0, 0.5   # reply duration: log-normal around 8 s
WORDS_PER_S = 2.5                          # speaking rate
QUESTION_WORDS = (4, 30)
FRAMES_PER_S = 12.5                        # Mimi
IMAGE_EVERY = 2                            # --encoder_cache rows: every second one has an image
IMAGE_SIDE = 384                           # its width and height (SigLIP2 resizes it to 256)


def draw_exchange(rng, np_rng):
    """A typed question and its reply, of realistic lengths -> (the conversation, the reply's speech as
    flat Mimi codes, frame by frame)."""
    seconds = float(np_rng.lognormal(np.log(SPEECH_MEDIAN_S), SPEECH_SIGMA))
    question = " ".join(rng.choices(WORDS, k=rng.randint(*QUESTION_WORDS))) + "?"
    reply = " ".join(rng.choices(WORDS, k=max(1, round(seconds * WORDS_PER_S)))) + "."
    codes = np_rng.integers(0, mo.CODEBOOK_SIZE, round(seconds * FRAMES_PER_S) * mo.N_CODEBOOKS)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], codes


def synthetic_samples(tok, n, max_len, seed=0):
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        conversation, codes = draw_exchange(rng, np_rng)
        ids, text_labels, audio_labels = mo.build_sample(conversation, tok, max_len, answer_codes=codes,
                                                         has_spk=True, **train.draw_variations(rng))
        samples.append(train.Sample(ids, text_labels, audio_labels, train.valid_length(text_labels, audio_labels),
                                    None, None, torch.randn(mo.OmniConfig.spk_emb_size)))
    return samples


def write_t2a_rows(path, n, seed=0):
    """n T2A rows in the release's schema: a typed question, a text reply and its Mimi codes, the reply's
    speech lasting as long as in synthetic_samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    columns = dict(conversations=[], answer_audios=[])
    for _ in range(n):
        conversation, codes = draw_exchange(rng, np_rng)
        columns["conversations"].append(json.dumps(conversation))
        columns["answer_audios"].append([codes.tolist()])
    pq.write_table(pa.table(columns), path)
    return path


def compare_group_by_length(model, optimizer, tok, device, autocast, batch_size, max_len, warmup, steps, mode,
                            epoch_rows=1024):
    """The padding share of one epoch of `epoch_rows` T2A rows in the release's order and grouped by
    estimated length, and the mean seconds per step over the first `steps` batches of each order after
    `warmup` (their widths are a sample of the epoch's: a mean, not a median, weighs them as the epoch does)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = train.ParquetRows([write_t2a_rows(os.path.join(tmp, "t2a.parquet"), epoch_rows)])
        data = train.OmniDataset(rows, tok, max_len)
        started = time.perf_counter()
        estimates = train.estimated_lengths(rows, tok, max_len)
        estimate_s = time.perf_counter() - started
        lengths = torch.tensor([data[i].length for i in range(len(rows))])
        orders = {"release order": train.EpochBatches(len(rows), batch_size, seed=0, epoch=0),
                  "grouped": train.EpochBatches(len(rows), batch_size, seed=0, epoch=0, lengths=estimates)}
        padding = {name: 1 - lengths.sum().item() / sum(len(b) * lengths[b].max().item() for b in order.batches)
                   for name, order in orders.items()}
        print(f"{epoch_rows} T2A rows, sample lengths: median {int(lengths.median())}, max {int(lengths.max())} "
              f"(of {max_len - 1}); estimated in {estimate_s:.2f} s, the estimate {np.corrcoef(estimates, lengths)[0, 1]:.2f} "
              f"correlated with the true lengths; padding share of the epoch: "
              + ", ".join(f"{name} {share:.0%}" for name, share in padding.items()))
        variants = {name: [train.collate([data[i] for i in b.tolist()]) for b in order.batches[:warmup + steps]]
                    for name, order in orders.items()}
    for name, batches in variants.items():
        real = sum(b.tokens for b in batches[warmup:]) / sum(b.text_labels.numel() for b in batches[warmup:])
        print(f"  {name}: timed batches {1 - real:.0%} padding, widths {[b.input_ids.shape[-1] for b in batches[warmup:]]}")
    seconds = {name: 0.0 for name in variants}
    for i in range(warmup + steps):  # the orders take turns, step by step
        for name, batches in variants.items():
            step = time_steps(model, optimizer, {name: batches[i:i + 1]}, device, autocast, 0, 1, mode)[name]
            seconds[name] += step if i >= warmup else 0.0
    return {name: total / steps for name, total in seconds.items()}


def estimate_memory(tok, device, max_lens):
    """Estimated peak GPU memory of one training step of the full-size dense model: per (dtype,
    checkpointing, max_seq_len), the bytes for the model (any batch) and per sample:

        weights, gradients and AdamW's two moments     16 bytes a parameter (float32)
        autocast's low-precision copies of the weights  2 bytes a parameter (bfloat16 only)
        activations                                      per sample: what the forward pass keeps for the
                                                         backward pass (torch.autograd.graph.saved_tensors_hooks,
                                                         each storage once) at batch 2 less at batch 1, every
                                                         sample max_seq_len long with a text label at its end
                                                         (the widest batch there is: no block stops early)
        working memory                                  per sample: twice its share of the largest saved
                                                         tensor (its gradient and a temporary), and with
                                                         checkpointing one block's recomputed activations

    Allocator overhead and the CUDA context are not included (report_memory leaves USABLE_MARGIN_GIB
    of each GPU for them). The CPU's autocast stands in for CUDA's (both cast matmuls to bfloat16 and
    keep the loss in float32), and the CPU's flash attention for CUDA's (neither keeps T x T scores)."""
    torch.manual_seed(0)
    model = mo.MiniMindO(mo.OmniConfig()).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    blocks = len(model.thinker.layers) + len(model.talker.layers)

    def widest(sample, length):
        """The sample as the widest there is: `length` positions, the last with a text label (so that every
        block, the upper ones too, runs on all of them)."""
        text_labels = sample.text_labels.clone()
        text_labels[length - 1] = sample.input_ids[mo.TEXT_ROW, length - 1]
        return replace(sample, length=length, text_labels=text_labels)

    def saved_bytes(batch, autocast):
        """(all bytes saved for backward, the largest saved tensor's bytes per sample) of one step on `batch`."""
        storages, largest = {}, 0
        def pack(t):
            nonlocal largest
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            if t.dim() and t.shape[0] == len(batch.input_ids):
                largest = max(largest, t.numel() * t.element_size() // len(batch.input_ids))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train.micro_step(train.Losses(model), batch, train.Encoders(), autocast, lambda x: x, "all")
        model.zero_grad(set_to_none=True)
        return sum(storages.values()), largest

    table = {}
    for dtype in ("bfloat16", "float32"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
        for max_len in max_lens:
            samples = [widest(s, max_len - 1) for s in synthetic_samples(tok, 2, max_len)]
            one, two = train.collate(samples[:1]).to(device), train.collate(samples).to(device)
            per_sample = {}
            for checkpointing in (False, True):
                model.thinker.checkpointing = model.talker.checkpointing = checkpointing
                (at_one, _), (at_two, largest) = saved_bytes(one, autocast), saved_bytes(two, autocast)
                per_sample[checkpointing] = (at_two - at_one, largest)
            one_block = (per_sample[False][0] - per_sample[True][0]) / blocks
            for checkpointing, (activations, largest) in per_sample.items():
                table[dtype, checkpointing, max_len] = (params * (16 + 2 * (dtype == "bfloat16")),
                                                        activations + 2 * largest + one_block * checkpointing)
    model.thinker.checkpointing = model.talker.checkpointing = False
    return params, table


def write_a2a_rows(path, n, seed=0):
    """n A2A rows in the release's schema: a spoken question (with an image on every IMAGE_EVERY-th
    row), a text reply and its Mimi codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    from PIL import Image
    import side_assets
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    voice = files.load_audio(side_assets.QUESTION_WAV, mo.SAMPLE_RATE_SPEECH)
    columns = dict(conversations=[], question_audios=[], answer_audios=[], image_bytes=[])
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(*QUESTION_WORDS))
        question = np.resize(voice, round(len(words) / WORDS_PER_S * mo.SAMPLE_RATE_SPEECH))  # repeated
        audio, image = io.BytesIO(), io.BytesIO()
        sf.write(audio, question, mo.SAMPLE_RATE_SPEECH, format="WAV")
        has_image = i % IMAGE_EVERY == 0
        if has_image:
            pixels = np_rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image, format="PNG")
        seconds = float(np_rng.lognormal(np.log(SPEECH_MEDIAN_S), SPEECH_SIGMA))
        reply = " ".join(rng.choices(WORDS, k=max(1, round(seconds * WORDS_PER_S)))) + "."
        columns["conversations"].append(json.dumps([
            {"role": "user", "content": ("<image>" if has_image else "") + " ".join(words) + "?"},
            {"role": "assistant", "content": reply}]))
        columns["question_audios"].append([audio.getvalue()])
        columns["answer_audios"].append([np_rng.integers(0, mo.CODEBOOK_SIZE, round(seconds * FRAMES_PER_S)
                                                         * mo.N_CODEBOOKS).tolist()])
        columns["image_bytes"].append([image.getvalue()] if has_image else [])
    pq.write_table(pa.table(columns), path)
    return path


def time_encoder_cache(model, optimizer, tok, device, autocast, batch_size, max_len, warmup, steps, mode):
    """Median seconds per optimizer step, from rows to the AdamW update, and of its data part (rows to
    batch), without a cache, while writing it (first epoch) and reading it back (warm); the variants
    take turns on distinct rows."""
    import side_assets
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rounds = warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        speech_folder = side_assets.build_sensevoice(tmp, side_assets.FULL_SENSEVOICE)
        vision_folder = side_assets.build_siglip(tmp, side_assets.FULL_SIGLIP)
        rows = train.ParquetRows([write_a2a_rows(os.path.join(tmp, "a2a.parquet"), batch_size * rounds)])
        speech = files.load_speech_encoder(speech_folder, device)
        vision, processor = files.load_vision_encoder(vision_folder, device)

        def dataset(cache):
            enc = train.Encoders(speech, speech.frontend, vision, processor)
            if cache:
                enc.speech_cache = train.EncoderCache(os.path.join(tmp, cache), "speech", speech_folder)
                enc.image_cache = train.EncoderCache(os.path.join(tmp, cache), "image", vision_folder)
            return train.OmniDataset(rows, tok, max_len, enc, augment="none")

        variants = {"no cache": dataset(None), "first epoch": dataset("first"), "warm cache": dataset("warm")}
        batches = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(rounds)]
        warm = variants["warm cache"]
        for rows_of_batch in batches:  # an earlier epoch fills the warm cache
            train.encode_inputs(train.collate([warm[i] for i in rows_of_batch]).to(device), warm.encoders)

        times = {name: [] for name in variants}
        for i, rows_of_batch in enumerate(batches):
            for name, data in variants.items():
                sync()
                start = time.perf_counter()
                batch = train.collate([data[r] for r in rows_of_batch]).to(device)
                batched = time.perf_counter()
                train.micro_step(train.Losses(model), batch, data.encoders, autocast, lambda x: x, mode)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start, batched - start))
        lengths = [len(warm[r].speech_cached.output) for r in range(len(rows))]
        print(f"SenseVoiceSmall {sum(p.numel() for p in speech.parameters()) / 1e6:.0f}M and SigLIP2 "
              f"{sum(p.numel() for p in vision.parameters()) / 1e6:.0f}M parameters; questions of "
              f"{min(lengths)}..{max(lengths)} encoder frames (60 ms each), an image "
              f"in every {IMAGE_EVERY}")
    return {name: np.median(t, axis=0).tolist() for name, t in times.items()}


def time_steps(model, optimizer, variants, device, autocast, warmup, steps, mode):
    """Median seconds per optimizer step of each variant. The variants take turns step by step, so a
    busy machine slows them alike; the first `warmup` rounds are not timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, batches in variants.items():
            batch = batches[i % len(batches)].to(device)
            sync()
            start = time.perf_counter()
            train.micro_step(train.Losses(model), batch, train.Encoders(), autocast, lambda x: x, mode)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def time_checkpointing(model, optimizer, batches, device, autocast, warmup, steps, mode):
    """Median seconds per step without and with --grad_checkpointing, taking turns on the same batches."""
    times = {False: [], True: []}
    for i in range(warmup + steps):
        for checkpointing in times:
            model.thinker.checkpointing = model.talker.checkpointing = checkpointing
            seconds = time_steps(model, optimizer, {"step": [batches[i % len(batches)]]}, device, autocast, 0, 1, mode)
            if i >= warmup:
                times[checkpointing].append(seconds["step"])
    model.thinker.checkpointing = model.talker.checkpointing = False
    return {k: float(np.median(t)) for k, t in times.items()}


MEMORY_BATCHES = (4, 8, 16, 32, 40)
MEMORY_LENS = (256, 512)
GPU_SIZES = (8, 12, 16, 24)
USABLE_MARGIN_GIB = 1.0  # of a GPU's memory, left for the CUDA context and the allocator's fragmentation


def report_memory(tok, device):
    """docs/performance.md's memory table: estimated peak GiB per setting, and the largest batch that fits each GPU size."""
    params, table = estimate_memory(tok, device, MEMORY_LENS)
    print(f"ESTIMATED peak memory of one training step (GiB), full-size dense model ({params / 1e6:.0f}M parameters), "
          f"every sample max_seq_len long; not measured on a GPU; 'fits' leaves {USABLE_MARGIN_GIB:g} GiB of the GPU "
          "for the CUDA context")
    print("| --dtype | --grad_checkpointing | --max_seq_len | " + " | ".join(f"batch {b}" for b in MEMORY_BATCHES)
          + " | " + " | ".join(f"fits {g} GB" for g in GPU_SIZES) + " |")
    print("|---" * (3 + len(MEMORY_BATCHES) + len(GPU_SIZES)) + "|")
    gib = lambda static, per_sample, b: (static + per_sample * b) / 2**30
    for (dtype, checkpointing, max_len), (static, per_sample) in table.items():
        fits = [max(0, int(((g - USABLE_MARGIN_GIB) * 2**30 - static) // per_sample)) for g in GPU_SIZES]
        print(f"| {dtype} | {'on' if checkpointing else 'off'} | {max_len} | "
              + " | ".join(f"{gib(static, per_sample, b):.1f}" for b in MEMORY_BATCHES) + " | "
              + " | ".join(f"batch {f}" for f in fits) + " |")


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch_size", type=int, help="samples per step (default 40 on cuda, 2 on cpu)")
    p.add_argument("--max_seq_len", type=int, help="sample length (default 512 on cuda, 256 on cpu)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 10 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3 on cuda, 1 on cpu)")
    p.add_argument("--use_moe", action="store_true", help="the MoE model instead of the dense one")
    p.add_argument("--mode", choices=["all", "audio_proj", "vision_proj"], default="all",
                   help="what is trained, as train.py --mode (default all)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: as train.py finds it)")
    p.add_argument("--group_by_length", action="store_true",
                   help="compare the release's batch order with train.py --group_by_length on T2A rows")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="time the step with and without train.py --grad_checkpointing")
    p.add_argument("--memory", action="store_true",
                   help="estimate peak GPU memory per setting (docs/performance.md's memory table) instead of timing")
    p.add_argument("--encoder_cache", action="store_true",
                   help="time A2A rows through the full-size frozen encoders without, filling and reading "
                        "train.py's --encoder_cache, instead of the padding comparison")
    args = p.parse_args()
    on_gpu = args.device.startswith("cuda")
    batch_size = args.batch_size or (40 if on_gpu else 2)
    max_len = args.max_seq_len or (512 if on_gpu else 256)
    steps, warmup = args.steps or (10 if on_gpu else 3), args.warmup or (3 if on_gpu else 1)
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    try:
        tok = mo.load_tokenizer(train.tokenizer_folder(argparse.Namespace(tokenizer=args.tokenizer)))
    except FileNotFoundError as e:
        sys.exit(f"bench_train.py: {e}")
    torch.manual_seed(0)
    model = mo.MiniMindO(mo.OmniConfig(use_moe=args.use_moe)).to(device).train()
    optimizer = torch.optim.AdamW(train.set_trainable(model, args.mode), lr=1e-4)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'MoE' if args.use_moe else 'dense'} model {mo.parameter_counts(model)['total']:.2f}M on {name}; "
          f"batch {batch_size}, max_seq_len {max_len}, bf16 autocast {on_gpu}, --mode {args.mode}; {warmup} warm-up + "
          f"{steps} timed steps")

    if args.memory:
        report_memory(tok, device)
        return
    if args.group_by_length:
        results = compare_group_by_length(model, optimizer, tok, device, autocast, batch_size, max_len, warmup, steps,
                                          args.mode)
        for variant, seconds in results.items():
            print(f"  {variant:14s} {seconds * 1000:8.1f} ms/step  {batch_size / seconds:8.2f} samples/s")
        print(f"grouped by length: {results['release order'] / results['grouped']:.2f}x the samples/s")
        return
    if args.encoder_cache:
        results = time_encoder_cache(model, optimizer, tok, device, autocast, batch_size, max_len, warmup, steps,
                                     args.mode)
        for variant, (seconds, data_seconds) in results.items():
            print(f"  {variant:12s} {seconds * 1000:8.1f} ms/step ({data_seconds * 1000:6.1f} ms of it making the "
                  f"batch)  {batch_size / seconds:8.2f} samples/s")
        speed_up = lambda variant: results["no cache"][0] / results[variant][0]
        print(f"a warm encoder cache is {speed_up('warm cache'):.2f}x faster (the first epoch: "
              f"{speed_up('first epoch'):.2f}x)")
        return

    samples = synthetic_samples(tok, batch_size * (warmup + steps), max_len)
    lengths = np.array([s.length for s in samples])
    groups = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    variants = {"longest": [train.collate(g) for g in groups],
                "max_len": [train.collate([replace(s, length=max_len - 1) for s in g]) for g in groups]}
    real_tokens = np.mean([sum(s.length for s in g) for g in groups])
    print(f"sample lengths: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()} "
          f"(of {max_len - 1}); mean batch width when padded to the longest: "
          f"{np.mean([b.input_ids.shape[-1] for b in variants['longest']]):.0f}")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    if args.grad_checkpointing:
        results = time_checkpointing(model, optimizer, variants["longest"], device, autocast, warmup, steps, args.mode)
        print(f"  without {results[False] * 1000:8.1f} ms/step, with --grad_checkpointing {results[True] * 1000:8.1f} "
              f"ms/step: {results[True] / results[False]:.2f}x the time")
        return
    results = time_steps(model, optimizer, variants, device, autocast, warmup, steps, args.mode)
    for variant, seconds in results.items():
        print(f"  padded to {variant:8s} {seconds * 1000:8.1f} ms/step  {batch_size / seconds:8.1f} samples/s  "
              f"{real_tokens / seconds:9.0f} tokens/s")
    if on_gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (the max_len batches)")
    print(f"padding to the longest sample is {results['max_len'] / results['longest']:.2f}x faster")


if __name__ == "__main__":
    main()
