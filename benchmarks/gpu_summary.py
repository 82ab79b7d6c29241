"""
gpu_check.sh's last step: its stages' outcomes and results -> summary.json and summary.txt (printed too).

    python benchmarks/gpu_summary.py WORK_DIR OUT_DIR DEVICE SECONDS

WORK_DIR holds stages.jsonl (one line per stage: its status and seconds), NAME.out (each stage's output) and
NAME.jsonl (the results our benchmarks wrote); JSON lines in a stage's output (bench_vs_reference.py prints
one per side) count as its results too. The issue's goals are checked where the numbers are there.
"""
import json
import sys
from pathlib import Path

TAIL_LINES = 12                  # of a stage's output, for a stage that did not end well
GOAL_SPEEDUP, GOAL_MEMORY, GOAL_STEPS_PER_S = 3.0, 0.7, 300   # issue 12: vs the reference; decode single stream


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def json_lines(path):
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def stage_results(work, name):
    """What the stage's benchmark wrote (NAME.jsonl), else the JSON lines it printed."""
    return json_lines(work / f"{name}.jsonl") or json_lines(work / f"{name}.out")


def decode_lines(results):
    lines = []
    for way in ("decode_eager", "decode_compiled"):
        for r in results.get(way, []):
            lines.append(f"  {way[7:]:<9} {r['steps_per_s_text']:7.1f} steps/s while writing text, "
                         f"{r['steps_per_s_after_text']:.1f} after; first audio {ms(r['first_audio_s'])}, "
                         f"RTF {r['rtf']:.3f}, prefill {r['prefill_s'] * 1000:.1f} ms"
                         + (f"; warm-up {r['warm_up_s']:.0f} s, {r['graphs_compiled']} graphs, {r['recompiles']} "
                            f"recompiles, {r['cudagraph_skips']} CUDA-graph skips" if r.get("compiled") else ""))
    return lines


def train_lines(results):
    lines = []
    for way in ("train", "train_compiled"):
        for r in results.get(way, []):
            if "side" in r:
                lines.append(f"  {way:<14} {r['side']:<12} {r.get('samples_per_s')} samples/s, {r.get('tokens_per_s')} "
                             f"tokens/s, peak {r.get('peak_memory_mib')} MiB, {r.get('width')} positions per sample")
            else:  # the ratios line, or a line of another form
                lines.append(f"  {way:<14} {json.dumps(r)}")
    return lines


def goals(results):
    """The issue's GPU goals, where the numbers are there."""
    found = []
    compiled = results.get("decode_compiled", [])
    if compiled:
        rate = min(compiled[0]["steps_per_s_text"], compiled[0]["steps_per_s_after_text"])
        found.append(f"decode >= {GOAL_STEPS_PER_S} steps/s (compiled, single stream): {rate:.0f} "
                     f"{'met' if rate >= GOAL_STEPS_PER_S else 'NOT met'}")
    for way in ("train", "train_compiled"):
        sides = {r["side"]: r for r in results.get(way, [])
                 if {"side", "samples_per_s", "peak_memory_mib"} <= set(r)}
        ref = sides.pop("reference", None)
        for side, ours in sides.items() if ref else ():
            speedup = ours["samples_per_s"] / ref["samples_per_s"]
            memory = ours["peak_memory_mib"] / ref["peak_memory_mib"]
            found.append(f"{way} {side}: {speedup:.2f}x the reference's samples/s (goal >= {GOAL_SPEEDUP}x) "
                         f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}; peak memory {memory:.2f}x (goal <= "
                         f"{GOAL_MEMORY}x) {'met' if memory <= GOAL_MEMORY else 'NOT met'}")
    return found


def main(work, out, device, seconds):
    work, out = Path(work), Path(out)
    stages = json_lines(work / "stages.jsonl")
    results = {s["stage"]: stage_results(work, s["stage"]) for s in stages}
    summary = dict(device=device, seconds=int(seconds), stages=stages, results=results, goals=goals(results))
    lines = [f"gpu_check on {device}: {len(stages)} stages in {seconds} s"]
    lines += [f"  {s['stage']:<16} {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else "")
              for s in stages]
    lines += ["training (bench_vs_reference.py, one line per side):"] + (train_lines(results) or ["  no results"])
    lines += ["decode (bench_generate.py, full-size model, one stream):"] + (decode_lines(results) or ["  no results"])
    for r in results.get("resume", []):
        lines.append(f"torchrun resume: {'ok' if r['ok'] else 'FAILED'}"
                     + (f", killed after step {r['stopped_at']} of {r['steps']}, max loss difference "
                        f"{r['max_loss_diff']:.1e}" if "stopped_at" in r else "")
                     + "".join(f"\n  {p}" for p in r["problems"]))
    conformance = results.get("conformance", [])
    if conformance:
        lines.append("conformance generate cases, compiled decode steps (compiled_decode.py):")
        lines += [f"  {r['case']:<6} {r['way']:<9} {'ok' if r['ok'] else 'FAILED'}  {r['steps_per_s']:.0f} steps/s, "
                  f"first frame {ms(r['first_frame_s'])}" for r in conformance if "way" in r]
        lines += [f"  {r['graphs_compiled']} graphs compiled, {r['graphs_expected']} expected"
                  for r in conformance if "graphs_compiled" in r]
        lines += [f"  all ok: {r['ok']}, CUDA-graph skips {r['cudagraph_skips']}, torch {r['torch']}"
                  for r in conformance if "summary" in r]
    lines += ["goals:"] + [f"  {g}" for g in summary["goals"] or ["no numbers to check"]]
    for s in stages:
        if s["status"] != "ok" and (work / f"{s['stage']}.out").exists():
            tail = (work / f"{s['stage']}.out").read_text(errors="replace").splitlines()[-TAIL_LINES:]
            lines += [f"--- {s['stage']}: the end of its output"] + [f"  {t[:300]}" for t in tail]
    text = "\n".join(lines) + "\n"
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(*sys.argv[1:5])
