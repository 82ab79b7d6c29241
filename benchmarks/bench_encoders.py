"""Throughput of the frozen side modules on this machine, with random weights in the published architectures.

    python benchmarks/bench_encoders.py [--batch 8] [--repeats 3] [--threads N] [--device cuda]

Speech: clips of --seconds of espeak speech through encode_speech (front end included), tiny and full-size
SenseVoiceEncoderSmall. Vision: full-size SigLIP base-patch32-256 through encode_images (preprocessing
included). Mimi: encoding real-time factor and streaming decode, one frame per call.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import side_assets as assets  # noqa: E402
import minimind_o as sm  # noqa: E402
import files  # noqa: E402


DEVICE = "cpu"


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def best_seconds(fn, repeats):
    """Best wall time of `repeats` calls after one warm-up call (first calls pay one-off allocation costs)."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def speech_clip(seconds):
    """Real speech of the requested length: the two test clips back to back, repeated as needed."""
    speech = np.concatenate([files.load_audio(assets.HELLO_WAV, sm.SAMPLE_RATE_SPEECH),
                             files.load_audio(assets.QUESTION_WAV, sm.SAMPLE_RATE_SPEECH)])
    samples = int(seconds * sm.SAMPLE_RATE_SPEECH)
    return np.resize(speech, samples)       # np.resize repeats the array cyclically


def bench_speech(root, name, conf, args):
    encoder = files.load_speech_encoder(assets.build_sensevoice(Path(root) / name, conf), DEVICE)
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    clips = [speech_clip(args.seconds)] * args.batch
    batched = best_seconds(lambda: sm.encode_speech(encoder, clips), args.repeats)
    single = best_seconds(lambda: sm.encode_speech(encoder, clips[:1]), args.repeats)
    print(f"speech {name:5s} ({params:6.1f}M params, {args.seconds:.0f} s clips): "
          f"batch {args.batch}: {args.batch / batched:7.2f} clips/s | one at a time: {1 / single:7.2f} clips/s")


def bench_vision(root, args):
    model, processor = files.load_vision_encoder(assets.build_siglip(root, assets.FULL_SIGLIP), DEVICE)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rng = np.random.default_rng(0)
    from PIL import Image
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch)]
    batched = best_seconds(lambda: sm.encode_images(model, processor, images), args.repeats)
    single = best_seconds(lambda: sm.encode_images(model, processor, images[:1]), args.repeats)
    print(f"vision full  ({params:6.1f}M params, 640x480 RGB): "
          f"batch {args.batch}: {args.batch / batched:7.2f} images/s | one at a time: {1 / single:7.2f} images/s")


def bench_mimi(root, args):
    mimi = files.load_mimi(assets.build_mimi(root), DEVICE)
    wav = np.resize(files.load_audio(assets.QUESTION_WAV, sm.SAMPLE_RATE_MIMI), int(args.seconds * sm.SAMPLE_RATE_MIMI))
    encode = best_seconds(lambda: sm.encode_audio_codes(mimi, wav), args.repeats)
    codes = sm.encode_audio_codes(mimi, wav)

    def stream():
        with sm.MimiStreamDecoder(mimi, frames_per_call=1) as decoder:
            for frame in codes.T:
                decoder.push(frame)

    decode = best_seconds(stream, args.repeats)
    frames = codes.shape[1]
    print(f"mimi  full  ({args.seconds:.0f} s of audio): encode {args.seconds / encode:6.2f}x real time | "
          f"streaming decode 1 frame/call: {frames / decode:6.1f} frames/s "
          f"({frames / decode / (sm.SAMPLE_RATE_MIMI / sm.MIMI_FRAME_SAMPLES):5.2f}x real time)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["speech", "vision", "mimi"], help="run one benchmark")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {DEVICE}")
    with tempfile.TemporaryDirectory() as root:
        if args.only in (None, "speech"):
            bench_speech(root, "tiny", assets.TINY_SENSEVOICE, args)
            bench_speech(root, "full", assets.FULL_SENSEVOICE, args)
        if args.only in (None, "vision"):
            bench_vision(root, args)
        if args.only in (None, "mimi"):
            bench_mimi(root, args)


if __name__ == "__main__":
    main()
