"""
How fast does MiniMind-O talk? Streaming generation of the full-size model with speech decoded by Mimi, as
chat.py does it (mo.stream_generate + chat.SpeechOut), random weights in both.

    python benchmarks/bench_generate.py                              # CPU, PyTorch's own thread count
    taskset -c 0,1 python benchmarks/bench_generate.py --threads 2   # "2 CPU cores"
    python benchmarks/bench_generate.py --int8 --frames_per_call 4   # chat.py's fastest CPU setting
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --compile   # decode steps as CUDA graphs
    python benchmarks/bench_generate.py --conformance FIXTURE.pt [--device cuda]    # the compiled steps checked

Reports the median of --repeats runs after a warm-up run: the prefill, steps/s without Mimi (while the text
is written and after), the real-time factor (the reply's wall time / seconds of speech, Mimi included) and
the time to the first audio. Random weights would never end the text or the speech: the text ends after
--text_steps steps and the speech never stops early. --compile: MiniMindO.step and .speech_step under
torch.compile (CUDA graphs on a GPU). --conformance: a fixture's generate cases, compiled, must give the
expected text and frames, compile once per step and speaker variant, and never skip a CUDA graph.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import common
import chat  # noqa: E402  (before torch: it sets the OpenMP environment)
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import files  # noqa: E402
import minimind_o as mo  # noqa: E402
import side_assets  # noqa: E402

TARGET_RTF, TARGET_FIRST_AUDIO_S = 0.5, 0.4
DECODE_STEPS = ("step", "speech_step")   # what stream_generate calls once per column; prefill stays eager


# -----------------------------------------------------------------------------------------------
# The decode steps compiled
# -----------------------------------------------------------------------------------------------

def compile_decode(model, backend="inductor"):
    """Compile this model object's step and speech_step in place; returns the model. The steps have static
    shapes (one column, caches preallocated): dynamic=False makes a new shape a counted recompile rather than
    a silent dynamic graph, and fullgraph makes a graph break an error. The prefill runs once per prompt, at
    a new length each time: it stays eager."""
    cuda = next(model.parameters()).device.type == "cuda"
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    for name in DECODE_STEPS:
        setattr(model, name, torch.compile(getattr(model, name), backend=backend, mode=mode, fullgraph=True,
                                           dynamic=False))
    keep_caches(model)
    return model


def keep_caches(model):
    """Make model.setup_caches hand every attention layer the same KVCache again for a conversation of the same
    length, instead of new buffers: a CUDA graph reads and writes fixed addresses, so the steps are recorded
    once, not once per reply. What an earlier conversation left in a cache is never read: a step sees only
    the slots up to its own position (Attention's mask), all written by the conversation it belongs to."""
    new_caches, kept = model.setup_caches, {}
    holders = [m for m in model.modules() if hasattr(m, "kv_cache")]  # the attention layers

    def setup_caches(max_len):
        if max_len is not None and max_len not in kept:
            new_caches(max_len)
            kept[max_len] = [m.kv_cache for m in holders]
        for m, cache in zip(holders, kept[max_len] if max_len is not None else [None] * len(holders)):
            m.kv_cache = cache
    model.setup_caches = setup_caches


def graphs_compiled():
    return counters["stats"]["unique_graphs"]


def cudagraph_skips():
    """How often inductor fell back from CUDA graphs to plain kernels (it logs why: TORCH_LOGS=perf_hints)."""
    return counters["inductor"]["cudagraph_skips"]


def conformance(args):
    """The fixture's generate cases, eager and compiled -> result rows, the summary last."""
    fixture = torch.load(args.conformance, map_location="cpu", weights_only=False)
    rows = []
    for entry in (e for e in fixture["models"] if e["generate"]):
        def load():
            model = mo.MiniMindO(mo.OmniConfig(**entry["config"]))
            model.load_official_state_dict({k: v.float() for k, v in entry["state_dict"].items()})
            return model.float().to(args.device).eval()
        eager, before = load(), graphs_compiled()
        compiled = compile_decode(load(), args.compile_backend)
        for case in entry["generate"]:
            audio = None if case["audio_embeds"] is None else [case["audio_embeds"]]
            run = lambda model: mo.generate(model, case["prompt_ids"], max_new_tokens=case["max_new_tokens"],
                                            greedy=True, repetition_penalty=case["repetition_penalty"],
                                            ref_codes=case["ref_codes"], spk_emb=case["spk_emb"], audio_embeds=audio,
                                            eos_token_id=2)
            expected = (case["expected_text"], case["expected_frames"])
            outs = [run(compiled) for _ in range(1 + args.repeats)]   # the first compiles and records
            rows.append(dict(model=entry["name"], case=case["name"], eager_ok=tuple(run(eager)) == expected,
                             ok=all(tuple(out) == expected for out in outs)))
        variants = len({case["spk_emb"] is None for case in entry["generate"]})   # with a speaker embedding or not
        rows.append(dict(model=entry["name"], graphs_compiled=graphs_compiled() - before,
                         graphs_expected=len(DECODE_STEPS) * variants))
    ok = (all(r["ok"] for r in rows if "ok" in r) and cudagraph_skips() == 0
          and all(r["graphs_compiled"] == r["graphs_expected"] for r in rows if "graphs_compiled" in r))
    return rows + [dict(summary="compiled decode", ok=ok, device=args.device, backend=args.compile_backend,
                        torch=torch.__version__, cudagraph_skips=cudagraph_skips())]


# -----------------------------------------------------------------------------------------------
# The speed of a reply
# -----------------------------------------------------------------------------------------------

def script_lengths(model, text_steps):
    """Random weights made to behave like a trained model in length: the text ends (EOS) after `text_steps`
    steps and no codebook layer stops early. Wraps this model object's decode entry points (compiled or not)
    from outside: the step count is Python state, which must stay out of a compiled step."""
    prefill, step, speech_step = model.prefill, model.step, model.speech_step

    def never_stop(audio_logits):            # every step's audio logits (a copy: a CUDA graph owns its outputs)
        audio_logits = audio_logits.clone()
        audio_logits[..., mo.CODEBOOK_SIZE:] = float("-inf")
        return audio_logits

    def scripted(decode):                    # the prefill and the steps while the text is being written
        def run(*args):
            text_logits, audio_logits = decode(*args)
            model.steps_seen += 1
            if model.steps_seen > text_steps:
                text_logits = torch.full_like(text_logits, float("-inf"))
                text_logits[..., mo.IM_END] = 0.0
            return text_logits, never_stop(audio_logits)
        return run
    model.prefill, model.step = scripted(prefill), scripted(step)
    model.speech_step = lambda *args: never_stop(speech_step(*args))
    return model


def run_once(model, mimi, prompt, args, with_speech):
    """One reply -> timings. Mimi decodes in chat.SpeechOut (on the CPU in a thread of its own, as in chat.py)."""
    model.steps_seen = 0
    speech = chat.SpeechOut(mimi, args.frames_per_call) if with_speech else None
    start = time.perf_counter()
    stamps = []
    for step in mo.stream_generate(model, prompt, args.steps, greedy=False):
        stamps.append(time.perf_counter())
        if step.frame is not None and speech:
            speech.put(step.frame)
    pcm = speech.close() if speech else None
    end = time.perf_counter()
    text_end = min(args.text_steps + 1, len(stamps) - 1)
    result = {"prefill_s": stamps[0] - start,
              "steps_per_s_text": (text_end - 1) / (stamps[text_end] - stamps[1]),
              "steps_per_s_after_text": (len(stamps) - 1 - text_end) / (stamps[-1] - stamps[text_end])}
    if speech:
        speech_s = len(pcm) / mo.SAMPLE_RATE_MIMI
        result.update(rtf=(end - start) / speech_s, first_audio_s=speech.first_audio - start, speech_s=speech_s)
    return result


def measure(args):
    """The warm-up run, then --repeats runs without speech and --repeats with -> the result."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mo.MiniMindO(mo.OmniConfig()).to(device, getattr(torch, args.dtype)).eval()
    if args.int8:
        model = chat.int8_linears(model)
    if args.compile:
        compile_decode(model, args.compile_backend)
    model = script_lengths(model, args.text_steps)
    with tempfile.TemporaryDirectory() as tmp:
        mimi = files.load_mimi(side_assets.build_mimi(tmp), device)
    prompt = torch.randint(mo.NEWLINE + 1, model.config.vocab_size, (args.prompt_tokens,))
    warm_up = time.perf_counter()
    run_once(model, mimi, prompt, args, with_speech=True)  # allocator, kernels, first-call caches, compiling
    warm_up = time.perf_counter() - warm_up
    graphs = graphs_compiled()
    runs = {way: [run_once(model, mimi, prompt, args, with_speech=way) for _ in range(args.repeats)]
            for way in (False, True)}
    median = lambda way, key: statistics.median(r[key] for r in runs[way])
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu, {torch.get_num_threads()} threads", "dtype": "int8 Linear" if args.int8 else args.dtype,
            "frames_per_call": args.frames_per_call, "prefill_s": median(False, "prefill_s"), "steps_per_s_text": median(False, "steps_per_s_text"),
            "steps_per_s_after_text": median(False, "steps_per_s_after_text"), "rtf": median(True, "rtf"),
            "first_audio_s": median(True, "first_audio_s"), "speech_s": runs[True][0]["speech_s"],
            "warm_up_s": warm_up, "graphs_compiled": graphs,
            "recompiles": graphs_compiled() - graphs, "cudagraph_skips": cudagraph_skips(),
            "load": os.getloadavg()[0]}


def report(r, args):
    print(f"MiniMind-O dense ({r['dtype']}), {r['device']}, {args.frames_per_call} frame(s)/decode call; median of "
          f"{args.repeats}")
    if args.compile:
        print(f"  compiled steps        {r['graphs_compiled']} graphs in the warm-up run ({r['warm_up_s']:.1f} s), "
              f"{r['recompiles']} recompiles after it, {r['cudagraph_skips']} CUDA-graph skips")
    print(f"  prefill {args.prompt_tokens} tokens   {r['prefill_s'] * 1000:7.1f} ms")
    print(f"  steps/s (model only)  {r['steps_per_s_text']:7.1f} while writing text, {r['steps_per_s_after_text']:.1f} after")
    print(f"  RTF with Mimi         {r['rtf']:7.3f}   (goal <= {TARGET_RTF}; {r['speech_s']:.1f} s of speech)")
    print(f"  first audio           {r['first_audio_s']:7.3f} s (goal <= {TARGET_FIRST_AUDIO_S})")
    print(f"  machine load (1-minute average) {r['load']:.1f}, this benchmark included")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model weights")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--int8", action="store_true", help="int8 Linear weights, as chat.py --int8 (CPU)")
    p.add_argument("--compile", action="store_true", help="the decode steps compiled (CUDA graphs on a GPU)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile and "
                   "--conformance (aot_eager: the same graphs traced and checked, no code generated; a quick check)")
    p.add_argument("--conformance", metavar="FIXTURE", help="check the compiled steps on a conformance fixture's "
                   "generate cases instead of timing")
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--steps", type=int, default=200, help="steps per reply (200 = 15.4 s of speech)")
    p.add_argument("--text_steps", type=int, default=48, help="steps before the text ends (about 3 per second "
                   "of speech)")
    p.add_argument("--frames_per_call", type=int, default=2, choices=range(1, 5), metavar="{1..4}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (--conformance: compiled runs per case after the "
                   "first)")
    p.add_argument("--json", help="also append the result as JSON lines to this file")
    args = p.parse_args(argv)
    if not 0 < args.text_steps < args.steps - mo.N_CODEBOOKS:
        p.error(f"--text_steps {args.text_steps} must leave speech-only steps in --steps {args.steps} (the rates "
                f"after the text are measured on them): use --steps above {args.text_steps + mo.N_CODEBOOKS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.conformance:
        rows = conformance(args)
        print("\n".join(json.dumps(r) for r in rows))
        print(f"compiled decode ({args.compile_backend} on {args.device}): "
              f"{'all cases match' if rows[-1]['ok'] else 'FAILED'}")
    else:
        rows = [measure(args)]
        report(rows[0], args)
    common.append_json(args.json, rows)
    return 0 if rows[-1].get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
