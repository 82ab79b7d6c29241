"""
How much does padding each batch only to its longest sample buy? One training step (forward,
backward, clipping, AdamW) of the full-size model, on the same synthetic T2A samples, two ways:

    longest   the batch is cut after its longest sample (what train.py does)
    max_len   every sample is padded to max_len (what the release does)

    python benchmarks/bench_train.py                                                  # CPU, small shapes
    python benchmarks/bench_train.py --device cuda --batch_size 40 --max_seq_len 512  # the release's shapes

Random weights; samples are built by minimind_o.build_sample from made-up English questions and
replies whose speech lasts a log-normal number of seconds (median 8 s, as in spoken-assistant data),
so lengths vary the way real T2A batches do. Reports samples/s and tokens/s (tokens = positions up to
each sample's last label: the same useful work in both rows): the median step after warm-up, the two
variants taking turns, with the GPU synchronised around every timed step.
"""
import argparse
import contextlib
import os
import random
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimind_o as mo  # noqa: E402
import train  # noqa: E402

WORDS = ("the quick answer is that light travels fast while sound moves more slowly through air water and stone "
         "so we see lightning before we hear thunder and this simple idea helps people estimate distance").split()
SPEECH_MEDIAN_S, SPEECH_SIGMA = 8.0, 0.5   # reply duration: log-normal around 8 s
WORDS_PER_S = 2.5                          # speaking rate
QUESTION_WORDS = (4, 30)
FRAMES_PER_S = 12.5                        # Mimi


def synthetic_samples(tok, n, max_len, seed=0):
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        seconds = float(np_rng.lognormal(np.log(SPEECH_MEDIAN_S), SPEECH_SIGMA))
        question = " ".join(rng.choices(WORDS, k=rng.randint(*QUESTION_WORDS))) + "?"
        reply = " ".join(rng.choices(WORDS, k=max(1, round(seconds * WORDS_PER_S)))) + "."
        codes = np_rng.integers(0, mo.CODEBOOK_SIZE, round(seconds * FRAMES_PER_S) * mo.N_CODEBOOKS)
        conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        ids, text_labels, audio_labels = mo.build_sample(conversation, tok, max_len, answer_codes=codes,
                                                         has_spk=True, **mo.draw_variations(rng))
        samples.append(train.Sample(ids, text_labels, audio_labels, train.valid_length(text_labels, audio_labels),
                                    None, None, torch.randn(mo.OmniConfig.spk_emb_size)))
    return samples


def time_steps(model, optimizer, variants, device, autocast, warmup, steps):
    """Median seconds per optimizer step of each variant. The variants take turns step by step, so a
    busy machine slows them alike; the first `warmup` rounds are not timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, batches in variants.items():
            batch = batches[i % len(batches)].to(device)
            sync()
            start = time.perf_counter()
            train.micro_step(model, batch, train.Encoders(), autocast, lambda x: x)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


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
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: as train.py finds it)")
    args = p.parse_args()
    on_gpu = args.device.startswith("cuda")
    batch_size = args.batch_size or (40 if on_gpu else 2)
    max_len = args.max_seq_len or (512 if on_gpu else 256)
    steps, warmup = args.steps or (10 if on_gpu else 3), args.warmup or (3 if on_gpu else 1)
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    tok = train.find_tokenizer(argparse.Namespace(tokenizer=args.tokenizer))
    samples = synthetic_samples(tok, batch_size * (warmup + steps), max_len)
    lengths = np.array([s.length for s in samples])
    groups = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    variants = {"longest": [train.collate(g) for g in groups],
                "max_len": [train.collate([replace(s, length=max_len - 1) for s in g]) for g in groups]}
    real_tokens = np.mean([sum(s.length for s in g) for g in groups])

    torch.manual_seed(0)
    model = mo.MiniMindO(mo.OmniConfig(use_moe=args.use_moe)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'MoE' if args.use_moe else 'dense'} model {mo.parameter_counts(model)['total']:.2f}M on {name}; "
          f"batch {batch_size}, max_seq_len {max_len}, bf16 autocast {on_gpu}; {warmup} warm-up + {steps} timed steps")
    print(f"sample lengths: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()} "
          f"(of {max_len - 1}); mean batch width when padded to the longest: "
          f"{np.mean([b.input_ids.shape[-1] for b in variants['longest']]):.0f}")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    results = time_steps(model, optimizer, variants, device, autocast, warmup, steps)
    for variant, seconds in results.items():
        print(f"  padded to {variant:8s} {seconds * 1000:8.1f} ms/step  {batch_size / seconds:8.1f} samples/s  "
              f"{real_tokens / seconds:9.0f} tokens/s")
    if on_gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (the max_len batches)")
    print(f"padding to the longest sample is {results['max_len'] / results['longest']:.2f}x faster")


if __name__ == "__main__":
    main()
