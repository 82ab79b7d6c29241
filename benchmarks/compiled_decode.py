"""
The decode step compiled: MiniMindO.step and .speech_step under torch.compile (on a GPU in
mode="reduce-overhead": each step recorded once as a CUDA graph, then replayed), and the conformance
generate cases run through them.

    python benchmarks/compiled_decode.py                                 # ../shared's fixture, CPU
    python benchmarks/compiled_decode.py --device cuda --json out.jsonl  # on a GPU
    python benchmarks/compiled_decode.py FIXTURE.pt                      # another fixture

Each generate case of the fixture runs through mo.stream_generate with the arguments
../shared/checks/conformance.py gives mo.generate (greedy), first eagerly, then with the compiled steps; the
compiled run must give the expected text and frames (the eager run's outcome is reported: it tells apart what
the device itself changes). Reported
per case and way: steps/s (the steps after the prefill) and the time to the first complete frame (prefill + 8
steps: speech can start there; no codec here), the median of --repeats runs after the compile/warm-up run, and
the graphs compiled: one per step function and speaker variant (with or without a speaker embedding). Any
other graph is a recompile, and a graph break is an error (fullgraph), so either fails the check.
bench_generate.py --compile uses compile_decode for the full-size model with Mimi.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import minimind_o as mo  # noqa: E402

DECODE_STEPS = ("step", "speech_step")   # what stream_generate calls once per column; prefill stays eager
DEFAULT_FIXTURE = ROOT.parent / "shared" / "fixtures" / "conformance_public.pt"


def compile_decode(model, backend="inductor"):
    """Compile this model object's step and speech_step in place; returns the model.

    The steps have static shapes (one column, caches preallocated), so they compile once each: dynamic=False
    makes any new shape a counted recompile rather than a silent dynamic graph, and fullgraph makes a graph
    break an error. The prefill stays eager: it runs once per prompt, at a new length each time."""
    cuda = next(model.parameters()).device.type == "cuda"
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    for name in DECODE_STEPS:
        setattr(model, name, torch.compile(getattr(model, name), backend=backend, mode=mode, fullgraph=True,
                                           dynamic=False))
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


def generate_kwargs(case):
    """mo.generate's arguments for a fixture's generate case, as the conformance check passes them."""
    return dict(max_new_tokens=case["max_new_tokens"], greedy=True, repetition_penalty=case["repetition_penalty"],
                ref_codes=case["ref_codes"], spk_emb=case["spk_emb"],
                audio_embeds=None if case["audio_embeds"] is None else [case["audio_embeds"]], eos_token_id=2)


def timed_generate(model, case):
    """One greedy generation of the case -> (text ids, frames, steps/s after the prefill, seconds to the first
    frame). stream_generate reads every step's ids on the host, so each step has finished when it is yielded."""
    torch.manual_seed(0)
    text, frames, stamps, first_frame = [], [], [], None
    start = time.perf_counter()
    for step in mo.stream_generate(model, case["prompt_ids"], **generate_kwargs(case)):
        stamps.append(time.perf_counter())
        if step.text is not None:
            text.append(step.text)
        if step.frame is not None:
            frames.append(step.frame)
            first_frame = first_frame or stamps[-1] - start
    steps_per_s = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return text, frames, steps_per_s, first_frame


def run_case(model, case, repeats):
    """The case's first run (compiles, records, warms up), then `repeats` timed ones -> (text, frames) of the
    first run, and a result dict: ok when every run gave the expected text and frames."""
    before = graphs_compiled()
    text, frames, _, _ = timed_generate(model, case)
    runs = [timed_generate(model, case) for _ in range(repeats)]
    ok = all(r[0] == case["expected_text"] and r[1] == case["expected_frames"] for r in [(text, frames)] + runs)
    return (text, frames), dict(ok=ok, text_len=len(text), frames=len(frames),
                                steps_per_s=statistics.median(r[2] for r in runs),
                                first_frame_s=statistics.median(r[3] for r in runs) if frames else None,
                                graphs=graphs_compiled() - before)


def report(r):
    print(f"{r['model']}/{r['case']:<8} {r['way']:<9} {'ok  ' if r['ok'] else 'FAIL'} {r['steps_per_s']:8.1f} steps/s, "
          f"first frame {'-' if r['first_frame_s'] is None else round(r['first_frame_s'] * 1000, 1)} ms  "
          f"({r['text_len']} text ids, {r['frames']} frames, {r['graphs']} graphs compiled"
          + ("" if r["way"] == "eager" else f", {'same as' if r['same_as_eager'] else 'DIFFERENT from'} eager")
          + ")", flush=True)


def load_model(entry, device):
    model = mo.MiniMindO(mo.OmniConfig(**entry["config"]))
    model.load_official_state_dict({k: v.float() for k, v in entry["state_dict"].items()})
    return model.float().to(device).eval()


def expected_graphs(cases):
    """One graph per step function and speaker variant: every case uses step (text) and, once its text has
    ended, speech_step; a speaker embedding (or none) is a different graph of each."""
    return len(DECODE_STEPS) * len({case["spk_emb"] is None for case in cases})


def check_fixture(path, device, backend, repeats):
    """Every generate case of the fixture, eager then compiled -> (results, all ok)."""
    fx = torch.load(path, map_location="cpu", weights_only=False)
    results, ok = [], True
    for entry in (e for e in fx["models"] if e["generate"]):
        eager, compiled = load_model(entry, device), compile_decode(load_model(entry, device), backend)
        graphs_before = graphs_compiled()
        for case in entry["generate"]:
            eager_out, r = run_case(eager, case, repeats)
            results.append(dict(model=entry["name"], case=case["name"], way="eager", **r))
            compiled_out, r = run_case(compiled, case, repeats)
            results.append(dict(model=entry["name"], case=case["name"], way="compiled",
                                same_as_eager=compiled_out == eager_out, **r))
            for r in results[-2:]:
                report(r)
            ok &= results[-1]["ok"]  # the compiled steps must conform; eager's outcome tells the device's part
        graphs = graphs_compiled() - graphs_before
        want = expected_graphs(entry["generate"])
        results.append(dict(model=entry["name"], graphs_compiled=graphs, graphs_expected=want))
        ok &= graphs == want
    return results, ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixture", nargs="?", default=str(DEFAULT_FIXTURE), help="a conformance fixture (.pt) with "
                   "generate cases (default: ../shared/fixtures/conformance_public.pt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: the same graphs, "
                   "traced and checked, without code generation: a quick check of the step's compilability)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and way")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; 1 keeps a busy machine's other jobs "
                   "from stalling every small op's threads)")
    p.add_argument("--json", help="also append the results as JSON lines to this file")
    args = p.parse_args(argv)
    if not Path(args.fixture).is_file():
        p.error(f"{args.fixture}: no such fixture (the conformance fixture lives in ../shared/fixtures)")

    if args.threads:
        torch.set_num_threads(args.threads)
    results, ok = check_fixture(args.fixture, torch.device(args.device), args.compile_backend, args.repeats)
    ok &= cudagraph_skips() == 0  # on a GPU every step must run as a CUDA graph (elsewhere there are none)
    results.append(dict(summary="compiled decode", ok=ok, device=args.device, backend=args.compile_backend,
                        torch=torch.__version__, cudagraph_skips=cudagraph_skips()))
    for r in results:
        if "graphs_compiled" in r:
            print(f"{r['model']}: {r['graphs_compiled']} graphs compiled, {r['graphs_expected']} expected "
                  f"({'no recompiles' if r['graphs_compiled'] == r['graphs_expected'] else 'RECOMPILED'})")
    print(f"compiled decode ({args.compile_backend} on {args.device}, {cudagraph_skips()} CUDA-graph skips): "
          f"{'all cases match' if ok else 'FAILED'}")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
