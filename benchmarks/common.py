"""What the benchmarks share: the project on the import path, the released tokenizer and the reference
checkout (an argument or the environment), synthetic rows, train.py's own step, and timing that takes turns.
Torch is imported inside the functions: chat.py, which sets the OpenMP environment, must come before it."""
import argparse
import io
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # the project, and tests/side_assets.py (random side modules)

REFERENCE_URL = "https://github.com/jingyaogong/minimind-o"
REFERENCE_TRAINER = os.path.join("trainer", "train_sft_omni.py")


def fail(message):
    sys.exit(f"{Path(sys.argv[0]).name}: {message}")


def tokenizer_folder(given=None):
    """The released tokenizer's folder: `given`, else $MINIMIND_TOKENIZER, else models/minimind-3o (where
    train.py fetches it when online)."""
    import train
    try:
        return train.tokenizer_folder(argparse.Namespace(tokenizer=given or os.environ.get("MINIMIND_TOKENIZER")))
    except FileNotFoundError as e:
        fail(e)


def reference_checkout(given=None):
    """A checkout of the release's code (jingyaogong/minimind-o): `given`, else $MINIMIND_O_REFERENCE."""
    folder = given or os.environ.get("MINIMIND_O_REFERENCE")
    if not folder or not os.path.isfile(os.path.join(folder, REFERENCE_TRAINER)):
        fail(f"needs a checkout of the release's code with {REFERENCE_TRAINER} (--reference, or set "
             f"MINIMIND_O_REFERENCE): git clone {REFERENCE_URL} /tmp/minimind-o")
    return os.path.abspath(folder)


def append_json(path, rows):
    """Append each row as one JSON line to `path`, when there is one."""
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


# -----------------------------------------------------------------------------------------------
# Synthetic rows in the release's schema
# -----------------------------------------------------------------------------------------------
# Made-up English questions and replies whose speech lasts a log-normal number of seconds (median 8 s, as in
# spoken-assistant data), so that lengths vary the way real batches do. A spoken question lasts its word
# count at the speaking rate: the committed espeak-ng clip repeated to that length.

WORDS = ("the quick answer is that light travels fast while sound moves more slowly through air water and stone "
         "so we see lightning before we hear thunder and this simple idea helps people estimate distance").split()
SPEECH_MEDIAN_S, SPEECH_SIGMA = 8.0, 0.5   # reply duration: log-normal around 8 s
WORDS_PER_S = 2.5                          # speaking rate
QUESTION_WORDS = (4, 30)
FRAMES_PER_S = 12.5                        # Mimi
IMAGE_EVERY = 2                            # spoken rows: every second one has an image
IMAGE_SIDE = 384                           # its width and height (SigLIP2 resizes it to 256)


def spoken_question(words):
    """The question's speech as WAV bytes: the committed clip repeated for as long as the words take to say."""
    import soundfile as sf
    import minimind_o as mo
    import files
    import side_assets
    voice = files.load_audio(side_assets.QUESTION_WAV, mo.SAMPLE_RATE_SPEECH)
    audio = io.BytesIO()
    sf.write(audio, np.resize(voice, round(len(words) / WORDS_PER_S * mo.SAMPLE_RATE_SPEECH)), mo.SAMPLE_RATE_SPEECH,
             format="WAV")
    return audio.getvalue()


def random_image(np_rng):
    from PIL import Image
    image = io.BytesIO()
    Image.fromarray(np_rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(image, format="PNG")
    return image.getvalue()


def write_rows(path, n, spoken=False, voice_frames=0, seed=0):
    """n rows: a question (typed, or spoken with an image on every IMAGE_EVERY-th row), a text reply and its
    speech as Mimi codes, a speaker embedding and, with voice_frames, that many frames of a voice prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import minimind_o as mo
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    columns = {name: [] for name in ("conversations", "answer_audios", "spk_emb", "ref_audios", "question_audios",
                                     "image_bytes")}
    for i in range(n):
        seconds = float(np_rng.lognormal(np.log(SPEECH_MEDIAN_S), SPEECH_SIGMA))
        words = rng.choices(WORDS, k=rng.randint(*QUESTION_WORDS))
        has_image = spoken and i % IMAGE_EVERY == 0
        reply = " ".join(rng.choices(WORDS, k=max(1, round(seconds * WORDS_PER_S)))) + "."
        columns["conversations"].append(json.dumps([
            {"role": "user", "content": ("<image>" if has_image else "") + " ".join(words) + "?"},
            {"role": "assistant", "content": reply}]))
        codes = lambda frames: np_rng.integers(0, mo.CODEBOOK_SIZE, frames * mo.N_CODEBOOKS).tolist()
        columns["answer_audios"].append([codes(round(seconds * FRAMES_PER_S))])
        columns["spk_emb"].append(np_rng.standard_normal(mo.SPK_EMBED_DIM).tolist())
        columns["ref_audios"].append(codes(voice_frames))
        columns["question_audios"].append([spoken_question(words)] if spoken else [])
        columns["image_bytes"].append([random_image(np_rng)] if has_image else [])
    schema = pa.schema([("conversations", pa.string()), ("answer_audios", pa.list_(pa.list_(pa.int32()))),
                        ("spk_emb", pa.list_(pa.float32())), ("ref_audios", pa.list_(pa.int32())),
                        ("question_audios", pa.list_(pa.binary())), ("image_bytes", pa.list_(pa.binary()))])
    used = [field for field in schema if any(columns[field.name])]   # the columns some row has a value in
    pq.write_table(pa.table({f.name: columns[f.name] for f in used}, schema=pa.schema(used)), path)
    return path


# -----------------------------------------------------------------------------------------------
# train.py's training step, and timing
# -----------------------------------------------------------------------------------------------

def learner(device, batch_size, max_len, flags=()):
    """train.py's Learner (model, loss, AdamW, autocast) as `train.py --from_weight none` builds it with these
    settings and train.py's flags: the full-size model with random weights unless flags say otherwise ->
    (the learner, train.py's args)."""
    import torch
    import train
    args = train.parse_args(["--data", "unused.parquet", "--from_weight", "none", "--device", str(device),
                             "--batch_size", str(batch_size), "--max_seq_len", str(max_len), *flags])
    train.check_device(args)   # an unset --dtype becomes the device's default
    built, _ = train.build_learner(args, train.Processes(0, 1, torch.device(device)), None)
    return built, args


def train_step(learner, args, batch, encoders=None):
    """An optimizer step on one batch, as train.py's loop takes it: forward with labels, backward,
    clipping, AdamW."""
    import data
    import torch
    import train
    with learner.autocast:
        loss = sum(learner.net(batch.input_ids, **train.batch_inputs(batch, encoders or data.Encoders(), args.mode)))
    learner.scaler.scale(loss).backward()
    learner.scaler.unscale_(learner.optimizer)
    torch.nn.utils.clip_grad_norm_(learner.params, args.grad_clip)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)


def synchronize(device):
    import torch
    if torch.device(device).type == "cuda":   # the GPU's queued work done: the time is the step's
        torch.cuda.synchronize(device)


def take_turns(variants, rounds, warmup, device):
    """{name: f(i)} -> {name: seconds of each timed call}. Round i calls every variant with i in turn, so a
    machine whose other load comes and goes slows them alike; the first `warmup` rounds are not timed."""
    times = {name: [] for name in variants}
    for i in range(warmup + rounds):
        for name, run in variants.items():
            synchronize(device)
            start = time.perf_counter()
            run(i)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
