"""
How fast does MiniMind-O talk? Streaming generation of the full-size model with speech decoded by Mimi,
exactly as chat.py does it (section 11's stream_generate + chat.SpeechOut).

    python benchmarks/bench_generate.py                              # CPU, PyTorch's own thread count
    taskset -c 0,1 python benchmarks/bench_generate.py --threads 2   # "2 CPU cores"
    python benchmarks/bench_generate.py --device cuda
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --compile   # CUDA-graph decode steps

Reports, as the median of --repeats runs after a warm-up run:
  prefill       the first step: the whole --prompt_tokens prompt at once
  steps/s       model steps per second without Mimi, while the text is being written and after it
  RTF           real-time factor = wall time of the reply / seconds of speech made (model + Mimi decode)
  first audio   from the call to the first decoded PCM: prefill + 8 steps + decoding the first frame
Goals on 2 CPU cores: RTF <= 0.5 and first audio <= 0.4 s. It runs with chat.py's OpenMP setting (a short spin,
then sleep: see chat.py) unless GOMP_SPINCOUNT is set otherwise; --int8 as chat.py --int8.

Weights are random (speed does not depend on them), but random weights never end the text or the speech
on their own, so the benchmark model ends its text after --text_steps steps (a reply's text is much
shorter than its speech: about 3 text tokens per second of speech) and never stops speaking early.
Every run thus makes exactly --steps steps and --steps - 8 frames.

--compile runs the decode steps compiled (benchmarks/compiled_decode.py: CUDA graphs on a GPU); the warm-up
run compiles them, and the report says how long it took and that nothing compiled again afterwards.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import chat  # noqa: E402  (first: it sets the OpenMP environment before torch loads)
import compiled_decode  # noqa: E402
import minimind_o as mo  # noqa: E402
import files  # noqa: E402
import torch  # noqa: E402

TARGET_RTF, TARGET_FIRST_AUDIO_S = 0.5, 0.4


def script_lengths(model, text_steps):
    """Random weights made to behave like a trained model in length: the text ends (EOS) after `text_steps`
    steps and no codebook layer stops early. Wraps this model object's decode entry points (compiled or not)
    from outside: the step count is Python state, which must stay out of a compiled step."""
    prefill, step, speech_step = model.prefill, model.step, model.speech_step

    def scripted_text(text_logits):          # the prefill and the steps while the text is being written
        model.steps_seen += 1
        if model.steps_seen > text_steps:
            text_logits = torch.full_like(text_logits, float("-inf"))
            text_logits[..., mo.IM_END] = 0.0
        return text_logits

    def never_stop(audio_logits):            # every step's audio logits (a copy: a CUDA graph owns its outputs)
        audio_logits = audio_logits.clone()
        audio_logits[..., mo.CODEBOOK_SIZE:] = float("-inf")
        return audio_logits

    def scripted(decode):
        def run(*args):
            text_logits, audio_logits = decode(*args)
            return scripted_text(text_logits), never_stop(audio_logits)
        return run

    model.prefill, model.step = scripted(prefill), scripted(step)
    model.speech_step = lambda *args: never_stop(speech_step(*args))
    return model


def busy_cores():
    """(total busy CPU seconds of the machine, of this process) so far, to tell how loaded the machine was."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except OSError:
        machine = float("nan")
    t = os.times()
    return machine, t.user + t.system


def run_once(model, mimi, prompt, args, with_speech):
    """One reply -> timings. Mimi decodes in chat.SpeechOut (a background thread unless --serial_decode)."""
    model.steps_seen = 0
    speech = chat.SpeechOut(mimi, args.frames_per_call, background=False if args.serial_decode else None) \
        if with_speech else None
    start = time.perf_counter()
    step_times, frames = [], 0
    for step in mo.stream_generate(model, prompt, args.steps, greedy=False):
        step_times.append(time.perf_counter())
        if step.frame is not None:
            frames += 1
            if speech:
                speech.put(step.frame)
    pcm = speech.close() if speech else None
    end = time.perf_counter()
    text_end = min(args.text_steps + 1, len(step_times) - 1)
    result = {"prefill_s": step_times[0] - start, "frames": frames,
              "steps_per_s_text": (text_end - 1) / (step_times[text_end] - step_times[1]),
              "steps_per_s_after_text": (len(step_times) - 1 - text_end) / (step_times[-1] - step_times[text_end])}
    if speech:
        seconds_of_speech = len(pcm) / mo.SAMPLE_RATE_MIMI
        assert len(pcm) == frames * mo.MIMI_FRAME_SAMPLES, "every frame must come out as 1920 samples"
        result.update(rtf=(end - start) / seconds_of_speech, first_audio_s=speech.first_audio - start,
                      speech_s=seconds_of_speech)
    return result


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model weights")
    p.add_argument("--mimi_dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--int8", action="store_true", help="int8 Linear weights, as chat.py --int8 (CPU)")
    p.add_argument("--moe", action="store_true", help="the MoE variant instead of the dense model")
    p.add_argument("--compile", action="store_true", help="the decode steps compiled (CUDA graphs on a GPU): "
                   "benchmarks/compiled_decode.py")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile (aot_eager: "
                   "the same graphs traced and checked, no code generated; a quick check)")
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--steps", type=int, default=200, help="steps per reply (200 = 15.4 s of speech)")
    p.add_argument("--text_steps", type=int, default=48, help="steps before the text ends (about 3 per second "
                   "of speech)")
    p.add_argument("--frames_per_call", type=int, default=2, choices=range(1, 5), metavar="{1..4}")
    p.add_argument("--serial_decode", action="store_true", help="decode Mimi in the generating thread on the CPU "
                   "too (no overlap; on a GPU that is the default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mimi", help="Mimi weights (file or folder); default: random weights")
    p.add_argument("--json", help="also append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if not 0 < args.text_steps < args.steps - mo.N_CODEBOOKS:
        p.error(f"--text_steps {args.text_steps} must leave speech-only steps in --steps {args.steps} (the rates "
                f"after the text are measured on them): use --steps above {args.text_steps + mo.N_CODEBOOKS}")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = mo.MiniMindO(mo.OmniConfig(use_moe=args.moe)).to(device, getattr(torch, args.dtype)).eval()
    if args.int8:
        model = chat.int8_linears(model)
    if args.compile:
        compiled_decode.compile_decode(model, args.compile_backend)
    model = script_lengths(model, args.text_steps)
    if args.mimi:
        mimi = files.load_mimi(args.mimi, device)
    else:
        from moshi.models import loaders as moshi_loaders
        mimi = moshi_loaders.get_mimi(None, device=device)
        mimi.set_num_codebooks(mo.N_CODEBOOKS)
        mimi.eval().requires_grad_(False)
    mimi = mimi.to(dtype=getattr(torch, args.mimi_dtype))
    prompt = torch.randint(mo.NEWLINE + 1, model.config.vocab_size, (args.prompt_tokens,))

    warm_up = time.perf_counter()
    run_once(model, mimi, prompt, args, with_speech=True)  # warm-up: allocator, kernels, first-call caches, compile
    warm_up = time.perf_counter() - warm_up
    graphs = compiled_decode.graphs_compiled()
    load_before = busy_cores()
    t0 = time.perf_counter()
    model_only = [run_once(model, mimi, prompt, args, with_speech=False) for _ in range(args.repeats)]
    with_speech = [run_once(model, mimi, prompt, args, with_speech=True) for _ in range(args.repeats)]
    wall = time.perf_counter() - t0
    load_after = busy_cores()
    others = max(0.0, (load_after[0] - load_before[0]) - (load_after[1] - load_before[1])) / wall

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} "
                  f"threads", "dtype": "int8 Linear" if args.int8 else args.dtype, "mimi_dtype": args.mimi_dtype, "moe": args.moe,
        "prompt_tokens": args.prompt_tokens, "steps": args.steps, "text_steps": args.text_steps,
        "frames_per_call": args.frames_per_call, "overlap": device.type == "cpu" and not args.serial_decode,
        "prefill_s": median_of(model_only, "prefill_s"),
        "steps_per_s_text": median_of(model_only, "steps_per_s_text"),
        "steps_per_s_after_text": median_of(model_only, "steps_per_s_after_text"),
        "rtf": median_of(with_speech, "rtf"), "first_audio_s": median_of(with_speech, "first_audio_s"),
        "speech_s": with_speech[0]["speech_s"], "other_load_cores": others, "compiled": args.compile,
        "warm_up_s": warm_up, "graphs_compiled": graphs, "recompiles": compiled_decode.graphs_compiled() - graphs,
        "cudagraph_skips": compiled_decode.cudagraph_skips()}
    print(f"MiniMind-O {'MoE' if args.moe else 'dense'} ({result['dtype']}), {result['device']}, Mimi {args.mimi_dtype} "
          f"{'overlapped' if result['overlap'] else 'serial'}, {args.frames_per_call} frame(s)/decode call; "
          f"median of {args.repeats}")
    if args.compile:
        print(f"  compiled steps        {graphs} graphs in the warm-up run ({warm_up:.1f} s), {result['recompiles']} "
              f"recompiles after it, {result['cudagraph_skips']} CUDA-graph skips")
    print(f"  prefill {args.prompt_tokens} tokens   {result['prefill_s'] * 1000:7.1f} ms")
    print(f"  steps/s (model only)  {result['steps_per_s_text']:7.1f} while writing text, "
          f"{result['steps_per_s_after_text']:.1f} after")
    print(f"  RTF with Mimi         {result['rtf']:7.3f}   (goal <= {TARGET_RTF}; "
          f"{result['speech_s']:.1f} s of speech)")
    print(f"  first audio           {result['first_audio_s']:7.3f} s (goal <= {TARGET_FIRST_AUDIO_S})")
    if device.type == "cpu":
        print(f"  other load on the machine meanwhile: {others:.2f} cores busy")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
