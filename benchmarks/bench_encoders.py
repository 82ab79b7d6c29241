"""Throughput of the frozen side modules on this machine, with random weights in the published architectures.

    python benchmarks/bench_encoders.py [--batch 8] [--repeats 3] [--threads N] [--device cuda] [--only speech]

Speech: clips of --seconds of espeak-ng speech through encode_speech (front end included), full-size
SenseVoiceEncoderSmall. Vision: full-size SigLIP2 base-patch32-256 through encode_images (preprocessing
included). Mimi: encoding real-time factor and streaming decode, one frame per call. Each the best of
--repeats after one untimed call (first calls pay one-off allocation costs).
"""
import argparse
import tempfile

import common
import chat  # noqa: E402  (before torch: it sets the OpenMP environment)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import files  # noqa: E402
import minimind_o as mo  # noqa: E402
import side_assets as assets  # noqa: E402


def best_seconds(variants, args):
    """{name: f()} -> {name: the best seconds of --repeats calls}."""
    times = common.take_turns({name: lambda i, f=f: f() for name, f in variants.items()}, args.repeats, 1, args.device)
    return {name: min(t) for name, t in times.items()}


def speech(root, args):
    encoder = files.load_speech_encoder(assets.build_sensevoice(root, assets.FULL_SENSEVOICE), args.device)
    clip = np.concatenate([files.load_audio(assets.HELLO_WAV, mo.SAMPLE_RATE_SPEECH),
                           files.load_audio(assets.QUESTION_WAV, mo.SAMPLE_RATE_SPEECH)])
    clips = [np.resize(clip, int(args.seconds * mo.SAMPLE_RATE_SPEECH))] * args.batch   # repeated to the length
    best = best_seconds({"batch": lambda: mo.encode_speech(encoder, clips),
                         "one": lambda: mo.encode_speech(encoder, clips[:1])}, args)
    print(f"speech full ({sum(p.numel() for p in encoder.parameters()) / 1e6:6.1f}M params, {args.seconds:.0f} s clips): "
          f"batch {args.batch}: {args.batch / best['batch']:7.2f} clips/s | one at a time: {1 / best['one']:7.2f} clips/s")


def vision(root, args):
    from PIL import Image
    model, processor = files.load_vision_encoder(assets.build_siglip(root, assets.FULL_SIGLIP), args.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch)]
    best = best_seconds({"batch": lambda: mo.encode_images(model, processor, images),
                         "one": lambda: mo.encode_images(model, processor, images[:1])}, args)
    print(f"vision full ({sum(p.numel() for p in model.parameters()) / 1e6:6.1f}M params, 640x480 RGB): "
          f"batch {args.batch}: {args.batch / best['batch']:7.2f} images/s | one at a time: {1 / best['one']:7.2f} images/s")


def mimi(root, args):
    codec = files.load_mimi(assets.build_mimi(root), args.device)
    wav = np.resize(files.load_audio(assets.QUESTION_WAV, mo.SAMPLE_RATE_MIMI), int(args.seconds * mo.SAMPLE_RATE_MIMI))
    codes = mo.encode_audio_codes(codec, wav)

    def stream():
        speech = chat.SpeechOut(codec, frames_per_call=1, background=False)
        for frame in codes.T:
            speech.put(frame)
        speech.close()
    best = best_seconds({"encode": lambda: mo.encode_audio_codes(codec, wav), "decode": stream}, args)
    frames_per_s = codes.shape[1] / best["decode"]
    print(f"mimi  full  ({args.seconds:.0f} s of audio): encode {args.seconds / best['encode']:6.2f}x real time | "
          f"streaming decode 1 frame/call: {frames_per_s:6.1f} frames/s "
          f"({frames_per_s / (mo.SAMPLE_RATE_MIMI / mo.MIMI_FRAME_SAMPLES):5.2f}x real time)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["speech", "vision", "mimi"], help="run one benchmark")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.device}")
    with tempfile.TemporaryDirectory() as root:
        for bench in (speech, vision, mimi):
            if args.only in (None, bench.__name__):
                bench(root, args)


if __name__ == "__main__":
    main()
