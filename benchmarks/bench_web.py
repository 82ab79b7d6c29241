"""
How soon does the web chat speak? From the end of a question to the first sound in the page, measured by the
page itself (chat_web.html's per-turn number), `python chat.py --web` serving the full-size model with random
weights (Mimi and SenseVoice-Small too: tests/side_assets.py), its codec head made never to stop early.

    python benchmarks/bench_web.py                    # CPU, 5 typed and 5 spoken questions
    python benchmarks/bench_web.py --int8 --frames_per_call 4

Typed: from the click on Send. Spoken (a call, Chromium's fake microphone playing espeak-ng speech): from the
end of the speech, the VAD's silence included. The first sound is when the page schedules the reply's first
frame to play. Needs the released tokenizer ($MINIMIND_TOKENIZER, else models/minimind-3o) and Chromium.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

import files
import minimind_o as mo
import side_assets
import web

SILENCE_BETWEEN_S = 8.0   # after each spoken question: its reply ends before the next one (no barge-in)
LEAD_SILENCE_S = 0.5
START_TIMEOUT_S = 300
TURN_TIMEOUT_MS = 120_000


def build_parts(folder):
    """The full-size model (random, speaking to the end), Mimi and SenseVoice-Small, in their published layouts."""
    torch.manual_seed(0)
    model = mo.MiniMindO(mo.OmniConfig())
    with torch.no_grad():  # codec specials (stop, pad) never win: every reply speaks for all its steps
        for linear in [model.talker.lm_head.base] + [a[2] for a in model.talker.lm_head.adapters]:
            linear.weight[mo.CODEBOOK_SIZE:] = 0
    checkpoint = folder / "full_random.pth"
    files.save_checkpoint(model, str(checkpoint))
    return {"checkpoint": checkpoint, "mimi": side_assets.build_mimi(folder).parent,
            "sensevoice": side_assets.build_sensevoice(folder, side_assets.FULL_SENSEVOICE)}


def fake_mic(path, questions):
    speech = files.load_audio(str(side_assets.HELLO_WAV), mo.SAMPLE_RATE_SPEECH)
    silence = lambda s: np.zeros(int(s * mo.SAMPLE_RATE_SPEECH), np.float32)
    import soundfile as sf
    sf.write(path, np.concatenate([silence(LEAD_SILENCE_S)] + [np.concatenate([speech, silence(SILENCE_BETWEEN_S)])
                                                               for _ in range(questions)]), mo.SAMPLE_RATE_SPEECH)


def start_server(parts, args, log):
    command = [sys.executable, str(common.ROOT / "chat.py"), "--web", "--port", "0", "--checkpoint", str(parts["checkpoint"]),
               "--tokenizer", str(common.tokenizer_folder()), "--mimi", str(parts["mimi"]), "--sensevoice",
               str(parts["sensevoice"]), "--max_new_tokens", str(args.steps), "--frames_per_call",
               str(args.frames_per_call)] + (["--int8"] if args.int8 else []) + \
              (["--threads", str(args.threads)] if args.threads else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline, line = time.monotonic() + START_TIMEOUT_S, ""
    while "web chat: http" not in line:
        line = process.stdout.readline()
        if not line and (process.poll() is not None or time.monotonic() > deadline):
            process.kill()
            sys.exit(f"chat.py --web did not start (its log: {log.name})")
    return process, line.split("web chat: ")[1].split()[0]


def first_sounds(page, done_before):
    """Wait for the next turn to end; its first-sound time in seconds."""
    page.wait_for_function("n => chatState.order.filter(id => chatState.turns[id].done).length > n",
                           arg=done_before, timeout=TURN_TIMEOUT_MS)
    return page.evaluate("chatState.turns[chatState.order.at(-1)].firstSoundMs") / 1000


def measure(url, mic, questions):
    """Typed questions, then a call's spoken ones, in Chromium -> (typed seconds, spoken seconds, replies cut short);
    the first of each is a warm-up."""
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or sys.exit("needs Chromium (apt-get install -y chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}%noloop", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("chatState.connected")
        typed = []
        for n in range(questions + 1):
            page.fill("#text", f"What is {n} plus {n}?")
            page.click("#send")
            typed.append(first_sounds(page, n))
        page.click("#call")
        spoken = [first_sounds(page, questions + 1 + n) for n in range(questions + 1)]
        cut_short = page.evaluate("chatState.order.filter(id => chatState.turns[id].interrupted).length")
        browser.close()
    return typed[1:], spoken[1:], cut_short


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=5, help="typed and spoken questions each (after one warm-up)")
    p.add_argument("--steps", type=int, default=24, help="--max_new_tokens of each reply (the first frame is "
                   "complete after 8)")
    p.add_argument("--frames_per_call", type=int, default=2, choices=range(1, 5), metavar="{1..4}")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("building the full-size model, Mimi and SenseVoice with random weights ...", flush=True)
        parts = build_parts(folder)
        fake_mic(folder / "mic.wav", args.questions + 1)
        with open(folder / "server.log", "w") as log:
            process, url = start_server(parts, args, log)
        try:
            typed, spoken, cut_short = measure(url, folder / "mic.wav", args.questions)
        finally:
            process.terminate()
            process.wait()
    setting = f"{'int8' if args.int8 else 'float32'}, {args.frames_per_call} frame(s)/decode call, " \
              f"{args.threads or torch.get_num_threads()} threads"
    print(f"first sound in the page, full-size model on {setting}; median (min-max) of {args.questions}:")
    for name, times in (("typed  (from Send)", typed), ("spoken (from the end of speech)", spoken)):
        print(f"  {name:32s} {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})")
    print(f"  spoken, from the VAD's decision  {statistics.median(spoken) - web.VAD_SILENCE_MS / 1000:.2f} s")
    print(f"  (machine load, 5-minute average: {os.getloadavg()[1]:.1f} on {os.cpu_count()} cores, this benchmark "
          "included)")
    if cut_short:
        print(f"  {cut_short} replies were still running when the next spoken question came (barge-in): on a "
              f"machine this slow the spoken times include stopping them")
    return typed, spoken


if __name__ == "__main__":
    main()
