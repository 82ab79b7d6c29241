"""
The decode steps compiled: MiniMindO.step and .speech_step under torch.compile (on a GPU in
mode="reduce-overhead": each step recorded once as a CUDA graph, then replayed), checked on the
generate cases of a conformance fixture.

    python benchmarks/compiled_decode.py FIXTURE.pt                                   # CPU
    python benchmarks/compiled_decode.py FIXTURE.pt --device cuda --json out.jsonl    # on a GPU

Each generate case runs greedily through mo.stream_generate, eagerly and with the compiled steps, which
must give the expected text and frames (the eager outcome tells apart what the device itself changes),
compile once per step function and speaker variant (with a speaker embedding or without), and never break
a graph (fullgraph). Reported: steps/s after the prefill and the time to the first complete frame (prefill
+ 8 steps), medians of --repeats runs after the first. bench_generate.py --compile uses compile_decode.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimind_o as mo  # noqa: E402

DECODE_STEPS = ("step", "speech_step")   # what stream_generate calls once per column; prefill stays eager


def compile_decode(model, backend="inductor"):
    """Compile this model object's step and speech_step in place; returns the model.

    The steps have static shapes (one column, caches preallocated), so they compile once each: dynamic=False
    makes any new shape a counted recompile rather than a silent dynamic graph, and fullgraph makes a graph
    break an error. The prefill stays eager: it runs once per prompt, at a new length each time."""
    cuda = next(model.parameters()).device.type == "cuda"
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    for name in DECODE_STEPS:
        step = torch.compile(getattr(model, name), backend=backend, mode=mode, fullgraph=True, dynamic=False)
        setattr(model, name, step)
    keep_caches(model)
    return model


def keep_caches(model):
    """Make model.setup_caches hand every attention layer the same KVCache again for a conversation of the same
    length, instead of new buffers. A CUDA graph reads and writes fixed addresses, so the steps are recorded
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


def timed_generate(model, case):
    """One greedy generation of the case, with the arguments the conformance check gives mo.generate ->
    (text ids, frames, steps/s after the prefill, seconds to the first frame). stream_generate reads every
    step's ids on the host, so each step has finished when it is yielded."""
    audio = None if case["audio_embeds"] is None else [case["audio_embeds"]]
    torch.manual_seed(0)
    text, frames, stamps, first_frame = [], [], [], None
    start = time.perf_counter()
    for step in mo.stream_generate(model, case["prompt_ids"], max_new_tokens=case["max_new_tokens"], greedy=True,
                                   repetition_penalty=case["repetition_penalty"], ref_codes=case["ref_codes"],
                                   spk_emb=case["spk_emb"], audio_embeds=audio, eos_token_id=2):
        stamps.append(time.perf_counter())
        if step.text is not None:
            text.append(step.text)
        if step.frame is not None:
            frames.append(step.frame)
            first_frame = first_frame or stamps[-1] - start
    steps_per_s = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return text, frames, steps_per_s, first_frame


def run_case(model, case, repeats):
    """The first run (compiles, records, warms up), then `repeats` timed ones -> (the first run's text and
    frames, a result dict: ok when every run gave the expected text and frames)."""
    runs = [timed_generate(model, case) for _ in range(1 + repeats)]
    ok = all(text == case["expected_text"] and frames == case["expected_frames"] for text, frames, _, _ in runs)
    first_frames = [r[3] for r in runs[1:] if r[3] is not None]
    return runs[0][:2], dict(ok=ok, steps_per_s=statistics.median(r[2] for r in runs[1:]),
                             first_frame_s=statistics.median(first_frames) if first_frames else None)


def load_model(entry, device):
    model = mo.MiniMindO(mo.OmniConfig(**entry["config"]))
    model.load_official_state_dict({k: v.float() for k, v in entry["state_dict"].items()})
    return model.float().to(device).eval()


def check_model(entry, device, backend, repeats):
    """One fixture model's generate cases, eager then compiled -> result dicts, the graph count last."""
    eager, compiled = load_model(entry, device), compile_decode(load_model(entry, device), backend)
    before, results = graphs_compiled(), []
    for case in entry["generate"]:
        eager_out, eager_result = run_case(eager, case, repeats)
        compiled_out, compiled_result = run_case(compiled, case, repeats)
        results += [dict(model=entry["name"], case=case["name"], way="eager", **eager_result),
                    dict(model=entry["name"], case=case["name"], way="compiled", same_as_eager=compiled_out == eager_out,
                         **compiled_result)]
    speaker_variants = len({case["spk_emb"] is None for case in entry["generate"]})
    results.append(dict(model=entry["name"], graphs_compiled=graphs_compiled() - before,
                        graphs_expected=len(DECODE_STEPS) * speaker_variants))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixture", help="a conformance fixture (.pt) with generate cases")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: the same graphs, "
                   "traced and checked, without code generation: a quick check)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and way")
    p.add_argument("--json", help="also append the results as JSON lines to this file")
    args = p.parse_args(argv)
    if not Path(args.fixture).is_file():
        p.error(f"{args.fixture}: no such fixture")

    fixture = torch.load(args.fixture, map_location="cpu", weights_only=False)
    results = [r for entry in fixture["models"] if entry["generate"]
               for r in check_model(entry, torch.device(args.device), args.compile_backend, args.repeats)]
    # The compiled steps must conform, compile once per variant and, on a GPU, every step run as a CUDA graph.
    ok = (all(r["ok"] for r in results if r.get("way") == "compiled") and cudagraph_skips() == 0
          and all(r["graphs_compiled"] == r["graphs_expected"] for r in results if "graphs_compiled" in r))
    results.append(dict(summary="compiled decode", ok=ok, device=args.device, backend=args.compile_backend,
                        torch=torch.__version__, cudagraph_skips=cudagraph_skips()))
    for r in results:
        print(json.dumps(r))
    print(f"compiled decode ({args.compile_backend} on {args.device}): {'all cases match' if ok else 'FAILED'}")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
