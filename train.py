"""
Train MiniMind-O: one file, one loop, from parquet rows in the release's schema to a checkpoint.

    python train.py                                   # a 2-minute CPU demo on data it makes itself
    python train.py --data dataset/sft_t2a_mini.parquet --from_weight out/llm_768.pth --save_weight sft_zero
    torchrun --nproc_per_node 4 train.py --data ...   # the same on 4 GPUs (DistributedDataParallel)
    python train.py --data ... --resume               # continue a killed run exactly where it stopped
    python train.py --data ... --augment none --encoder_cache cache   # encode each question/image once
    python train.py --prepare my_manifest.jsonl my_data.parquet       # your own recordings -> --data file

What happens, in the order of this file:
  1. command line          every flag, its default, and what the demo uses instead
  2. frozen encoders       SenseVoice (speech) and SigLIP2 (images): never trained, run under no_grad;
                           --encoder_cache DIR stores their outputs once and reads them back afterwards
  3. parquet rows          one row -> Python values, checked; a bad row names its file, row and column
  4. question audio        decode, 16 kHz mono, the release's waveform/spectrogram augmentations
  5. one sample            draw the variations, cut the conversation, build the nine rows
  6. batches               a seeded shuffle per epoch (--group_by_length: rows of similar length together),
                           padded only to the longest sample in the batch
  7. demo data             a tiny arithmetic/colour T2A set in the official schema, made on the fly
  8. model and schedule    from a text-only MiniMind, a previous stage, or random; AdamW (fused),
                           cosine lr, --grad_checkpointing, --compile
  9. checkpoints           the release's fp16 weights + a separate resume file, both written atomically
 10. the training loop     accumulation, bf16 autocast, clipping, DDP, progress bar, metrics, loss plot,
                           a step out of GPU memory said in one line with the settings that need less
 11. data preparation      --prepare: a manifest of your own recordings -> parquet rows in the release's schema

A training run writes into --out_dir: `<save_weight>_<hidden>[_moe].pth` (the weights, loadable by
`files.load_model` and chat.py), `<save_weight>_resume.pt` (everything else needed to resume),
`<save_weight>_metrics.jsonl` (one line per logged step) and `<save_weight>_loss.png`.
"""
import argparse
import contextlib
import fcntl
import functools
import glob
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import textwrap
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import NamedTuple, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import minimind_o as mo
import files

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------------------------
# 1. Command line
# -----------------------------------------------------------------------------------------------
# The defaults follow the release's train_sft_omni.py. Without --data, train.py runs its demo: the DEMO
# preset replaces those defaults (a flag given still wins).

# The demo's max_seq_len leaves its two-exchange rows (~70 tokens) whole: cut_conversation keeps an earlier
# exchange only with 100 tokens to spare, so at 96 every row was cut to its first exchange, the model never
# saw a conversation go on, and a second question in the chat got blank lines back. Batches are padded to
# their longest sample, so the longer limit costs nothing.
DEMO = dict(from_weight="none", out_dir="out/demo", save_weight="demo", hidden_size=64, num_hidden_layers=4,
            max_seq_len=192, batch_size=8, learning_rate=2e-3, epochs=6, num_workers=0, log_every=1,
            save_every=50)
PUBLISHED_DATA = ("the release's data is `minimind-o_dataset` under `jingyaogong` on Hugging Face / `gongjy` on "
                  "ModelScope")
TOKENIZER = files.PARTS["tokenizer"]   # the released tokenizer: where it goes by default, how to get it


MIN_SEQ_LEN = 16  # a one-turn conversation's template alone takes about 10 tokens
COMPILE_WIDTH = 64  # --compile: batch widths are multiples of this (see compiled)


at_least_0 = files.number(int, lambda n: n >= 0, "a number >= 0")
probability = files.number(float, lambda p: 0 <= p <= 1, "a probability (0 to 1)")
sequence_length = files.number(int, lambda n: n >= MIN_SEQ_LEN, f"a length of at least {MIN_SEQ_LEN} tokens")

DESCRIPTION = "\n\n".join([
    "Train MiniMind-O (Thinker-Talker) on parquet rows in the release's schema.",
    textwrap.fill("Without --data it runs the demo: it writes a small made-up dataset and trains a tiny model on it "
                  "from random weights, on the CPU in several minutes (its progress bar gives the estimate), with "
                  "these settings unless a flag says otherwise: "
                  + ", ".join(f"--{name} {value}" for name, value in DEMO.items()) + ".", width=100)])

EXAMPLES = """\
examples:
  python train.py                                      the demo: a tiny model on made-up rows, on the CPU
  python train.py --data dataset/sft_t2a_mini.parquet --from_weight out/llm_768.pth --save_weight sft_zero \\
      --learning_rate 5e-4 --batch_size 40 --max_seq_len 512            the release's mini stage 1 (text to speech)
  python train.py --data dataset/sft_a2a_mini.parquet --from_weight out/sft_zero_768.pth --save_weight sft_zero \\
      --mode audio_proj --learning_rate 5e-4 --batch_size 40 --max_seq_len 640      stage 2: the audio projector
  python train.py --data dataset/sft_a2a_mini.parquet --from_weight out/sft_zero_768.pth --save_weight sft_zero \\
      --learning_rate 2e-5 --batch_size 16 --max_seq_len 768                       stage 3: all of it, speech in
  torchrun --nproc_per_node 4 train.py ... --batch_size 10              the same on 4 GPUs (per-process batches)
  python train.py ... --resume                         continue a killed run exactly where it stopped
  python train.py --prepare my/manifest.jsonl my/data.parquet       your own recordings -> rows for --data

The release's recipes (stage order, modes, learning rates, lengths) are in README.md and docs/training.md;
what each option costs and saves (--dtype, --grad_checkpointing, --compile, --group_by_length,
--encoder_cache) is measured in docs/performance.md.
"""


class HelpFormat(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's and the examples' own line breaks."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormat, description=DESCRIPTION, epilog=EXAMPLES)
    data_flags(p.add_argument_group("data"))
    model_flags(p.add_argument_group("model"))
    optimisation_flags(p.add_argument_group("optimisation"))
    output_flags(p.add_argument_group("output"))
    prepare_flags(p.add_argument_group("data preparation (--prepare)"))
    args = p.parse_args(argv)
    if args.data is None:  # the demo preset, under the flags given
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)
    return args


def data_flags(data):
    data.add_argument("--data", nargs="+", metavar="PARQUET",
                      help="parquet files in the release's schema (README.md, 'Your own data'); none: the demo")
    data.add_argument("--max_seq_len", type=sequence_length, default=512,
                      help="sample length in tokens; longer conversations are cut (default %(default)s)")
    data.add_argument("--augment", choices=["both", "wave", "spec", "none"], default="both",
                      help="the release's question-audio augmentations: waveform, spectrogram (default %(default)s)")
    data.add_argument("--scheduled_sampling", type=probability, default=0.05,
                      help="chance that a labelled input id is replaced by a random one (default %(default)s)")
    data.add_argument("--skip_bad_rows", action="store_true",
                      help="report and skip malformed rows (or --prepare lines) instead of stopping at the first")
    data.add_argument("--group_by_length", action="store_true",
                      help="batch rows of similar length together: less padding, not the release's row order")
    data.add_argument("--num_workers", type=at_least_0, default=4,
                      help="DataLoader processes per GPU (default %(default)s)")
    data.add_argument("--tokenizer",
                      help=f"folder with tokenizer.json (default: --from_weight's folder, else {TOKENIZER.place})")
    data.add_argument("--speech_encoder", default="models/SenseVoiceSmall",
                      help="SenseVoiceSmall folder, for rows with question audio (default %(default)s)")
    data.add_argument("--vision_encoder", default="models/siglip2-base-p32-256-ve",
                      help="SigLIP2 folder, for rows with images (default %(default)s)")
    data.add_argument("--encoder_cache", metavar="DIR",
                      help="store the frozen encoders' outputs in DIR, to read back in later epochs and runs")


def model_flags(model):
    model.add_argument("--from_weight", default="out/llm_768.pth",
                       help="start: llm_768.pth, a previous stage's .pth or folder, or 'none' (default %(default)s)")
    model.add_argument("--mode", choices=["all", "audio_proj", "vision_proj"], default="all",
                       help="what trains: everything, or only the speech or image projector (default %(default)s)")
    model.add_argument("--use_moe", action="store_true", help="mixture-of-experts FFNs, with --from_weight none")
    model.add_argument("--hidden_size", type=files.positive, default=768,
                       help="Thinker and Talker width, with --from_weight none (default %(default)s)")
    model.add_argument("--num_hidden_layers", type=files.positive, default=8,
                       help="Thinker blocks, with --from_weight none; the Talker has half (default %(default)s)")


def optimisation_flags(opt):
    opt.add_argument("--epochs", type=files.positive, default=1, help="passes over the data (default %(default)s)")
    opt.add_argument("--max_steps", type=files.positive, help="stop after this many optimizer steps")
    opt.add_argument("--batch_size", type=files.positive, default=32,
                     help="samples per GPU per micro-batch (default %(default)s)")
    opt.add_argument("--accumulation_steps", type=files.positive, default=1,
                     help="micro-batches summed before each optimizer step (default %(default)s)")
    opt.add_argument("--learning_rate", type=files.finite_above_0, default=5e-4,
                     help="peak lr of the cosine schedule, which ends at a tenth of it (default %(default)s)")
    opt.add_argument("--weight_decay", type=files.finite_at_least_0, default=0.01,
                     help="AdamW weight decay (default %(default)s)")
    opt.add_argument("--grad_clip", type=files.finite_above_0, default=1.0,
                     help="clip the gradient norm to this (default %(default)s)")
    opt.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                     help="autocast precision (default bfloat16 on a GPU, float32 on the CPU; float16 needs a GPU)")
    opt.add_argument("--grad_checkpointing", action="store_true",
                     help="recompute each block in the backward pass: 2.5-3x less activation memory")
    opt.add_argument("--compile", action="store_true",
                     help=f"torch.compile the block stacks, batch widths rounded up to a multiple of {COMPILE_WIDTH}")
    opt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cuda, cuda:N, mps or cpu (default %(default)s); under torchrun each process takes its GPU")
    opt.add_argument("--seed", type=files.random_seed, default=42,
                     help="seeds the weights, the data order and every per-sample choice (default %(default)s)")


def output_flags(out):
    out.add_argument("--out_dir", default="out", help="where checkpoints and logs go (default %(default)s)")
    out.add_argument("--save_weight", default="sft_omni",
                     help="checkpoint name: <out_dir>/<save_weight>_<hidden>[_moe].pth (default %(default)s)")
    out.add_argument("--save_every", type=at_least_0, default=1000,
                     help="optimizer steps between checkpoints, 0 for the end only (default %(default)s)")
    out.add_argument("--log_every", type=files.positive, default=10,
                     help="optimizer steps between metric lines (default %(default)s)")
    out.add_argument("--resume", action="store_true",
                     help="continue from <out_dir>/<save_weight>_resume.pt exactly where it was written")


def prepare_flags(prep):
    prep.add_argument("--prepare", nargs=2, metavar=("MANIFEST", "OUT"),
                      help="instead of training, turn a JSON-lines manifest of recordings into OUT, a --data file")
    prep.add_argument("--mimi", default="models/mimi",
                      help=f"folder with {files.MIMI_WEIGHTS} (or the file) (default %(default)s)")
    prep.add_argument("--campplus", default="models/campplus",
                      help=f"folder with {files.CAMPP_WEIGHTS}, for lines that name a voice (default %(default)s)")
    prep.add_argument("--prepare_chunk", type=int, default=PREPARE_CHUNK,
                      help="manifest lines per part file, kept when a killed --prepare starts again "
                           "(default %(default)s)")


# -----------------------------------------------------------------------------------------------
# 2. The frozen encoders ("ears and eyes")
# -----------------------------------------------------------------------------------------------
# Their adapters are minimind_o.py section 12. Training splits SenseVoice in two: the front end
# (fbank, LFR stacking, CMVN: plain signal processing) runs in the data workers on the CPU, where the
# spectrogram augmentation can be applied to its output; the encoder runs on the training device.

def run_speech_encoder(encoder, feats, lengths):
    """Device half: (B, L, 560) features, (B,) lengths -> (B, L, 512) SenseVoice outputs."""
    return encoder.encoder(feats, lengths)[0]


def run_vision_encoder(vision, pixels):
    """(N, 3, 256, 256) SigLIP2 input -> (N, 64, 768) patch tokens."""
    return vision(pixel_values=pixels).last_hidden_state


# --encoder_cache DIR. The encoders are frozen, so an input's output never changes: it is stored the
# first time it is computed and read back in later epochs and by later runs on the same data (the mini
# recipe trains on the A2A file twice: --mode audio_proj, then --mode all). One float16 file each:
#
#     DIR/speech-<encoder id>/<data file id>/<row>-<user turn>.npy    (L, 512) SenseVoice output
#     DIR/image-<encoder id>/<data file id>/<row>.npy                 (64, 768) SigLIP2 output
#
# An id is a name and a hash of what the outputs depend on: the absolute path, size and modification
# time of the data file, or of every file in the encoder folder. A rewritten data file or a changed
# encoder gets new ids, so no stale entry is ever read (old ones stay until DIR is deleted). Question
# audio is cached only with --augment none: the augmentations change it every epoch; images always
# (their preprocessing is fixed). The data workers read the entries, and skip decoding, fbank and
# image preprocessing for them; the training step encodes the rest of the batch in one call per
# encoder and writes their outputs, each to a temporary file renamed into place, so a reader (a
# worker, another process) finds a whole entry or none.

CACHE_DTYPE = torch.float16
ID_HASH_CHARS = 12   # hex digits of the sha1 in an id


def identity(path):
    """'<name>-<hash>' of a data file or an encoder folder; the hash covers the absolute path and the
    size and modification time of the file, or of each file in the folder."""
    path = os.path.abspath(path)
    paths = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in paths if os.path.isfile(f)]
    digest = hashlib.sha1(repr(stats).encode()).hexdigest()[:ID_HASH_CHARS]
    return f"{os.path.splitext(os.path.basename(path))[0]}-{digest}"


class EncoderCache:
    """One frozen encoder's outputs under DIR/<kind>-<encoder id>/, one float16 .npy file per key
    ('<data file id>/<row>' for an image, '<data file id>/<row>-<user turn>' for a question)."""

    def __init__(self, root, kind, encoder_folder):
        self.folder = os.path.join(root, f"{kind}-{identity(encoder_folder)}")

    def path(self, key):
        return os.path.join(self.folder, key + ".npy")

    def get(self, key):
        """The stored (L, D) float16 output, or None."""
        try:
            return torch.from_numpy(np.load(self.path(key)))
        except FileNotFoundError:
            return None

    def put(self, key, output):
        """Store one (L, D) output as float16, atomically."""
        with files.atomic_path(self.path(key)) as tmp:  # a reader finds a whole entry or none
            np.save(tmp, output.to("cpu", CACHE_DTYPE).numpy())

    def put_batch(self, keys, outputs, lengths=None):
        """Store outputs[b, :lengths[b]] (all of outputs[b] without lengths) under keys[b], for each
        sample that has a key; the batch is copied to the CPU once."""
        if all(key is None for key in keys):
            return
        outputs = outputs.to("cpu", CACHE_DTYPE)
        lengths = [None] * len(keys) if lengths is None else lengths.tolist()
        for key, output, n in zip(keys, outputs, lengths):
            if key is not None:
                self.put(key, output[:n])


class Cached(NamedTuple):
    """An input's --encoder_cache entry: the encoder's stored output (a hit), else the key to store the
    output under once it is encoded (a miss). Cached() without a cache."""
    output: Optional[torch.Tensor] = None   # (L, 512) / (64, 768) float16
    key: Optional[str] = None


def look_up(cache, key):
    """The Cached entry of `key` in `cache` (an EncoderCache or None)."""
    if cache is None:
        return Cached()
    output = cache.get(key)
    return Cached(output, key if output is None else None)


@dataclass
class Encoders:
    """What the data workers need (CPU-side) and what the training step runs on the device."""
    speech: Optional[torch.nn.Module] = None   # SenseVoice encoder, on the device
    speech_frontend: Optional[torch.nn.Module] = None  # funasr's front end (CPU), for mo.speech_features
    vision: Optional[torch.nn.Module] = None   # SigLIP2 vision tower, on the device
    image_processor: Optional[object] = None   # SigLIP2 preprocessing (resize 256, normalise)
    speech_cache: Optional[EncoderCache] = None  # --encoder_cache, with --augment none
    image_cache: Optional[EncoderCache] = None   # --encoder_cache


def load_encoders(rows, args, device):
    """Load only the encoders the data needs: T2A data needs neither."""
    enc, option = Encoders(), None
    try:
        if rows.has_any("question_audios"):
            option = "--speech_encoder"
            with files.loading("sensevoice", args.speech_encoder):
                enc.speech = files.load_speech_encoder(args.speech_encoder, device)
            enc.speech_frontend = enc.speech.frontend
        if rows.has_any("image_bytes"):
            option = "--vision_encoder"
            with files.loading("siglip", args.vision_encoder):
                enc.vision, enc.image_processor = files.load_vision_encoder(args.vision_encoder, device)
    except (FileNotFoundError, files.DamagedPartError) as e:  # say which option points there
        raise type(e)(f"{option}: {e}") from e
    return enc


def open_caches(enc, args):
    """--encoder_cache: a cache for each loaded encoder whose inputs are not augmented; returns a line
    saying what is cached."""
    cached = []
    if enc.speech is not None and args.augment == "none":
        enc.speech_cache = EncoderCache(args.encoder_cache, "speech", args.speech_encoder)
        cached.append("SenseVoice outputs (question audio)")
    if enc.vision is not None:
        enc.image_cache = EncoderCache(args.encoder_cache, "image", args.vision_encoder)
        cached.append("SigLIP2 outputs (images)")
    line = f"encoder cache {args.encoder_cache}: " + (" and ".join(cached) or "nothing to cache")
    if enc.speech is not None and enc.speech_cache is None:
        line += (f"; question audio is not cached: --augment {args.augment} changes it every epoch "
                 "(--augment none would cache it)")
    elif enc.speech is None and enc.vision is None:
        line += " (no row has question audio or an image)"
    return line


# -----------------------------------------------------------------------------------------------
# 3. Parquet rows in the release's schema
# -----------------------------------------------------------------------------------------------

class BadRow(ValueError):
    """A row that cannot become a sample; the message says where it is and what is wrong."""

    @classmethod
    def at(cls, file, row, column, problem):
        return cls(f"{file}, row {row}, column {column}: {problem}")


@dataclass
class Row:
    """One conversation as Python values (nothing decoded yet but JSON)."""
    file: str
    row: int
    source: str                  # identity() of the data file: where its --encoder_cache entries are
    conversations: list          # [{role, content}]
    question_audios: list        # audio-file bytes per user turn (may be empty or shorter)
    answer_audios: list          # flattened frame-major codes (np.ndarray) per assistant turn
    image: Optional[bytes]       # the first image of the row
    ref_codes: Optional[np.ndarray]
    spk_emb: Optional[np.ndarray]


def items(cell):
    """A list cell -> its element scalars ([] for a missing column or a null)."""
    return [] if cell is None or not cell.is_valid else list(cell.values)


def numbers(cell):
    """A list-of-numbers cell -> a numpy array (empty for a missing column or a null)."""
    return np.zeros(0) if cell is None or not cell.is_valid else cell.values.to_numpy(zero_copy_only=False,
                                                                                      writable=True)


def list_of(is_item):
    """A check of an Arrow type: a list whose items pass is_item (or a list of nulls: every list empty)."""
    return lambda t: ((pa.types.is_list(t) or pa.types.is_large_list(t))
                      and (pa.types.is_null(t.value_type) or is_item(t.value_type)))


def is_bytes(t):
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


COLUMNS = {  # the release's columns: what each holds, and the Arrow types that can hold it
    "conversations": ("JSON text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "question_audios": ("a list of audio files (bytes)", list_of(is_bytes)),
    "answer_audios": ("a list of code lists (integers)", list_of(list_of(pa.types.is_integer))),
    "image_bytes": ("an image (bytes) or a list of them", lambda t: is_bytes(t) or list_of(is_bytes)(t)),
    "ref_audios": ("a list of codes (integers)", list_of(pa.types.is_integer)),
    "spk_emb": ("a list of numbers", list_of(lambda t: pa.types.is_integer(t) or pa.types.is_floating(t))),
}


class ParquetRows:
    """Every row of one or more parquet files, addressed by one index. Columns stay Arrow arrays
    (memory-mapped when the file allows); a row becomes Python values only when it is read."""

    def __init__(self, paths):
        self.tables = []
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"data file not found: {path} ({PUBLISHED_DATA})")
            try:
                table = pq.read_table(path, memory_map=True)
            except pa.ArrowException as e:
                raise ValueError(f"{path} is not a readable parquet file ({e})") from None
            if len(table) == 0:
                raise ValueError(f"{path} has no rows")
            if "conversations" not in table.column_names:
                raise BadRow.at(path, "-", "conversations", "missing: every row needs its conversation")
            for column, (holds, fits) in COLUMNS.items():
                if column in table.column_names and not fits(table.schema.field(column).type):
                    raise BadRow.at(path, "-", column, f"of type {table.schema.field(column).type}; it should hold "
                                                       f"{holds}")
            self.tables.append((path, table))
        self.sources = [identity(path) for path, _ in self.tables]
        self.starts = np.cumsum([0] + [len(t) for _, t in self.tables])

    def __len__(self):
        return int(self.starts[-1])

    def has_any(self, column):
        """Whether any row has a non-empty value in `column` (decides which encoders to load)."""
        for _, table in self.tables:
            if column in table.column_names:
                col = table.column(column)
                lengths = pc.binary_length(col) if is_bytes(col.type) else pc.list_value_length(col)
                if (pc.max(lengths).as_py() or 0) > 0:
                    return True
        return False

    def read(self, index):
        """Row `index` as Python values, checked: a problem raises BadRow naming file, row and column."""
        f = int(np.searchsorted(self.starts, index, side="right")) - 1
        path, table = self.tables[f]
        r = index - int(self.starts[f])
        file = os.path.basename(path)
        cell = lambda name: table.column(name)[r] if name in table.column_names else None

        def codes(values, column):
            if len(values) % mo.N_CODEBOOKS:
                raise BadRow.at(file, r, column, f"{len(values)} codes, not a multiple of {mo.N_CODEBOOKS} "
                                              f"(frame-major, {mo.N_CODEBOOKS} codes a frame)")
            if len(values) and not 0 <= values.min() <= values.max() < mo.CODEBOOK_SIZE:
                raise BadRow.at(file, r, column, f"codes must be in 0..{mo.CODEBOOK_SIZE - 1}, "
                                              f"found {values.min()}..{values.max()}")
            return values

        try:
            conversations = json.loads(cell("conversations").as_py())
        except (TypeError, json.JSONDecodeError) as e:
            raise BadRow.at(file, r, "conversations", f"malformed JSON ({e})") from None
        if not (isinstance(conversations, list) and conversations and all(isinstance(t, dict) for t in conversations)):
            raise BadRow.at(file, r, "conversations", "expected a non-empty JSON list of {role, content} objects")
        for t in conversations:
            if t.get("role") not in mo.ROLES:
                raise BadRow.at(file, r, "conversations", f"unknown role {t.get('role')!r} (expected one of "
                                                       f"{', '.join(mo.ROLES)})")
            if not isinstance(t.get("content"), str):
                raise BadRow.at(file, r, "conversations", f"a {t['role']} turn has no text content")

        ref, spk = numbers(cell("ref_audios")), numbers(cell("spk_emb"))  # empty: the row has none
        if len(spk) not in (0, mo.OmniConfig.spk_emb_size):
            raise BadRow.at(file, r, "spk_emb", f"{len(spk)} values, expected {mo.OmniConfig.spk_emb_size}")
        if not np.isfinite(spk).all():  # a NaN voice would turn every weight it reaches into NaN
            raise BadRow.at(file, r, "spk_emb", "holds values that are not numbers (NaN or infinite)")
        image = cell("image_bytes")  # bytes, or a list of bytes of which the first is used
        if isinstance(image, pa.ListScalar):
            image = next(iter(items(image)), None)
        return Row(file, r, self.sources[f], conversations,
                   question_audios=[a.as_py() for a in items(cell("question_audios"))],
                   answer_audios=[codes(numbers(turn), "answer_audios") for turn in items(cell("answer_audios"))],
                   image=None if image is None else image.as_py(),
                   ref_codes=codes(ref, "ref_audios") if len(ref) else None,
                   spk_emb=spk.astype(np.float32) if len(spk) else None)


# -----------------------------------------------------------------------------------------------
# 4. Question audio: decode, augment, features
# -----------------------------------------------------------------------------------------------
# The release's augmentations, each applied with its probability (and a range drawn uniformly).

SPEED = (0.5, 0.7, 1.6)              # resample to 0.7x..1.6x speed (tempo and pitch), fast and slow talkers
NOISE = (0.3, 0.001, 0.01)           # white noise of this standard deviation
VOLUME = (0.3, 0.8, 1.2)             # gain
DROPOUT = (0.2, 0.25)                # zero 0.25 s (a dropped packet), clips longer than a second only
LOWPASS = (0.2, (3, 5, 7))           # moving average over 3, 5 or 7 samples (a cheap microphone)
REVERB = (0.3, 0.05, 0.2, 10.0)      # a random 50-200 ms impulse response decaying by e^-10 (a room)
RUMBLE = (0.2, 0.003, 0.015)         # integrated (1/f^2) noise peaking at this level (room hum)
FREQ_MASK = (0.5, 64)                # SpecAugment: zero 1..64 of the 560 feature dims
TIME_MASK = (0.5, 10)                # SpecAugment: zero 1..10 feature frames
SPEECH_RATE = mo.SAMPLE_RATE_SPEECH


def augment_wave(wav, rng, np_rng, sr=SPEECH_RATE):
    """Simulate other speakers, rooms and microphones on a (S,) float32 waveform."""
    if rng.random() < SPEED[0]:
        wav = mo.resample(wav, sr, round(sr / rng.uniform(*SPEED[1:])))  # fewer samples = faster
    if rng.random() < NOISE[0]:
        wav = wav + np_rng.standard_normal(len(wav)).astype(np.float32) * rng.uniform(*NOISE[1:])
    if rng.random() < VOLUME[0]:
        wav = wav * rng.uniform(*VOLUME[1:])
    gap = int(sr * DROPOUT[1])
    if rng.random() < DROPOUT[0] and len(wav) > sr:
        start = rng.randint(0, len(wav) - gap)
        wav = np.concatenate([wav[:start], np.zeros(gap, np.float32), wav[start + gap:]])
    if rng.random() < LOWPASS[0]:
        k = rng.choice(LOWPASS[1])
        wav = np.convolve(wav, np.ones(k) / k, mode="same")
    if rng.random() < REVERB[0]:
        n = int(sr * rng.uniform(*REVERB[1:3]))
        ir = np_rng.standard_normal(n) * np.exp(-np.linspace(0, REVERB[3], n))
        ir[0] = 1.0                                              # the direct sound
        wav = np.convolve(wav, ir / np.linalg.norm(ir), mode="same")
    if rng.random() < RUMBLE[0]:
        rumble = np.cumsum(np_rng.standard_normal(len(wav)))
        wav = wav + rumble / (np.abs(rumble).max() + 1e-6) * rng.uniform(*RUMBLE[1:])
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


def augment_features(feats, rng):
    """SpecAugment on (L, 560) features: one band of dims and one run of frames set to zero."""
    feats = feats.clone()
    L, D = feats.shape
    if rng.random() < FREQ_MASK[0]:
        width = rng.randint(1, FREQ_MASK[1])
        start = rng.randint(0, D - width)
        feats[:, start:start + width] = 0
    if rng.random() < TIME_MASK[0] and L > 1:
        width = rng.randint(1, min(TIME_MASK[1], L))
        start = rng.randint(0, L - width)
        feats[start:start + width] = 0
    return feats


# -----------------------------------------------------------------------------------------------
# 5. One training sample
# -----------------------------------------------------------------------------------------------

# The release's per-sample variations (spec §2) and scheduled sampling (spec §3): what the sample
# builder mo.build_sample takes as arguments, drawn here for each sample.

SYSTEM_PROMPTS = [  # the release's; see P_SYSTEM_PROMPT
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。", "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。", "你是minimind，请尽力帮助用户解决问题。", "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.", "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model."]
P_SYSTEM_PROMPT = 0.2     # a conversation without a system turn gets one of SYSTEM_PROMPTS
P_KEEP_EMPTY_THINK = 0.2  # the reply keeps its empty think block
P_USE_REF = 0.5           # the voice prompt's reference frames are kept (else only the speaker slot)
AUDIO_LAYOUTS = {"audio_only": 0.4, "text_only": 0.2, "audio_blankline_text": 0.2, "text_blankline_audio": 0.2}
IMAGE_LAYOUTS = {"image_newline_text": 0.2, "image_blankline_text": 0.2, "text_newline_image": 0.2,
                 "text_blankline_image": 0.4}


def draw_variations(rng, has_system_turn=False):
    """The per-sample variations with the release's probabilities; rng is a random.Random."""
    pick = lambda table: rng.choices(list(table), weights=list(table.values()))[0]
    add_system = not has_system_turn and rng.random() < P_SYSTEM_PROMPT
    return dict(system_prompt=rng.choice(SYSTEM_PROMPTS) if add_system else None,
                keep_empty_think=rng.random() < P_KEEP_EMPTY_THINK, audio_layout=pick(AUDIO_LAYOUTS),
                image_layout=pick(IMAGE_LAYOUTS), use_ref=rng.random() < P_USE_REF)


def cut_conversation(conversations, reply_index, tok, max_len, margin=100):
    """Multi-turn rows: keep turns through the reply_index-th assistant turn, backing off to earlier
    replies while the rendered text plus `margin` tokens would not fit in max_len."""
    replies = [i for i, t in enumerate(conversations) if t["role"] == "assistant"]
    for r in range(reply_index, -1, -1):
        kept = conversations[:replies[r] + 1]
        if len(mo.encode(tok, mo.render_chat(kept))) + margin < max_len:
            break
    return kept


def scheduled_sampling(input_ids, text_labels, audio_labels, p=0.05, text_vocab=mo.TEXT_VOCAB, audio_vocab=mo.AUDIO_VOCAB,
                       generator=None):
    """Training only: replace a few ground-truth inputs by random ids, so the model learns to recover
    from its own mistakes at generation time. input_ids (B, 9, T) or (9, T); returns a new tensor."""
    ids = input_ids.clone()
    rand = lambda *shape: torch.rand(shape, generator=generator, device=ids.device)
    audio_pos = (audio_labels != mo.IGNORE).any(-2) & (rand(*ids.shape[:-2], ids.shape[-1]) < p)         # (..., T)
    noise = torch.randint(0, audio_vocab, ids[..., :mo.N_CODEBOOKS, :].shape, generator=generator, device=ids.device)
    ids[..., :mo.N_CODEBOOKS, :] = torch.where(audio_pos[..., None, :], noise, ids[..., :mo.N_CODEBOOKS, :])
    text = ids[..., mo.TEXT_ROW, :]
    text_pos = (text_labels != mo.IGNORE) & (text != mo.IMAGE_PLACEHOLDER) & (rand(*text.shape) < p)
    noise = torch.randint(0, text_vocab, text.shape, generator=generator, device=ids.device)
    ids[..., mo.TEXT_ROW, :] = torch.where(text_pos, noise, text)
    return ids


@dataclass
class Sample:
    input_ids: torch.Tensor               # (9, max_len-1)
    text_labels: torch.Tensor             # (max_len-1,)
    audio_labels: torch.Tensor            # (8, max_len-1)
    length: int                           # 1 + the last labelled position: the batch is cut there
    speech: Optional[torch.Tensor]        # (L, 560) SenseVoice features of the question to encode, or None
    pixels: Optional[torch.Tensor]        # (3, 256, 256) SigLIP2 input of the image to encode, or None
    spk_emb: Optional[torch.Tensor]       # (192,) or None
    speech_cached: Cached = Cached()      # --encoder_cache: the question's stored output (then speech is None)
    image_cached: Cached = Cached()       # the same for the image (then pixels is None)
    skipped: list = field(default_factory=list)  # the bad rows this sample replaces (--skip_bad_rows)


def valid_length(text_labels, audio_labels):
    """1 + the last labelled position. Later positions cannot change the loss (attention is causal),
    so a batch needs no more than its longest sample's valid length."""
    labelled = (text_labels != mo.IGNORE) | (audio_labels != mo.IGNORE).any(0)
    return int(labelled.nonzero().max()) + 1 if labelled.any() else 1


def sample_rng(seed, epoch, index):
    """The random choices of one sample depend on (seed, epoch, row) only: any worker, any resume."""
    return random.Random(f"{seed}/{epoch}/{index}")


def teaches_nothing(row, replies):
    """Raise BadRow for a row that would be trained on without teaching anything: no reply to learn,
    an image no turn points at (its features would never be injected), a question with neither speech nor text."""
    if replies == 0:
        raise BadRow.at(row.file, row.row, "conversations", "no assistant turn: there is no reply to learn")
    if row.image and not any(mo.IMAGE_MARK in t["content"] for t in row.conversations):
        raise BadRow.at(row.file, row.row, "image_bytes", f"an image, but no turn has an {mo.IMAGE_MARK} mark "
                                                           "where it goes")
    # An empty entry is how the release's data (and --prepare) say a turn was typed, not spoken: it is a
    # bad row only where that question has no text either, so there is nothing to answer.
    questions = [t["content"] for t in row.conversations if t["role"] == "user"]
    if any(len(audio) == 0 and not text.strip() for audio, text in zip(row.question_audios, questions)):
        raise BadRow.at(row.file, row.row, "question_audios", "an empty (0-byte) audio file for a question with "
                                                              "no text: nothing to answer")


class OmniDataset(Dataset):
    def __init__(self, rows, tok, max_len, encoders=None, augment="both", scheduled_sampling=0.05, seed=0,
                 skip_bad_rows=False):
        self.rows, self.tok, self.max_len, self.encoders = rows, tok, max_len, encoders or Encoders()
        self.wave_augment, self.spec_augment = augment in ("both", "wave"), augment in ("both", "spec")
        self.scheduled_sampling, self.seed, self.skip_bad_rows = scheduled_sampling, seed, skip_bad_rows
        self.epoch = 0  # set before each epoch's DataLoader starts its workers

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        """The Sample of row `index`. With skip_bad_rows a bad row is replaced by the next good one and
        its problem travels with that sample to be logged, so every batch keeps its size (and every
        process the same number of steps). Without it the BadRow itself is returned, and the training
        loop raises it."""
        problems = []
        for i in (k % len(self) for k in range(index, index + len(self))):
            try:
                sample = self.make_sample(self.rows.read(i), sample_rng(self.seed, self.epoch, i))
                sample.skipped = problems
                return sample
            except BadRow as e:
                if not self.skip_bad_rows:
                    return e  # raised by the training loop: a DataLoader worker's exception loses its type
                problems.append(str(e))
        raise ValueError(f"every row of the data is bad, e.g. {problems[0]}")

    def make_sample(self, row, rng):
        """Row -> Sample, every random choice drawn from rng (variations, cut, augmentation, noise)."""
        conversations = row.conversations
        variations = draw_variations(rng, has_system_turn=conversations[0]["role"] == "system")
        replies = sum(t["role"] == "assistant" for t in conversations)
        if replies > 1:  # multi-turn: learn one randomly chosen reply, with everything before it as context
            conversations = cut_conversation(conversations, rng.randrange(replies), self.tok, self.max_len)
        users = sum(t["role"] == "user" for t in conversations)
        replies = sum(t["role"] == "assistant" for t in conversations)
        teaches_nothing(row, replies)

        # the question audio (of the last kept user turn) and the image: encoder outputs read from the
        # cache, or encoder inputs (a miss keeps its key, to store the output once it is encoded)
        speech = pixels = None
        speech_cached = image_cached = Cached()
        turn = users - 1
        if 0 < users <= len(row.question_audios) and row.question_audios[turn]:
            speech_cached = look_up(self.encoders.speech_cache, f"{row.source}/{row.row}-{turn}")
            if speech_cached.output is None:
                speech = self.question_features(row, row.question_audios[turn], rng)
        if row.image:
            image_cached = look_up(self.encoders.image_cache, f"{row.source}/{row.row}")
            if image_cached.output is None:
                pixels = self.image_pixels(row)
        question = speech if speech is not None else speech_cached.output
        answer = row.answer_audios[replies - 1] if 0 < replies <= len(row.answer_audios) else None

        input_ids, text_labels, audio_labels = mo.build_sample(
            conversations, self.tok, self.max_len, answer_codes=answer, ref_codes=row.ref_codes,
            has_spk=row.spk_emb is not None, n_audio_tokens=0 if question is None else len(question),
            has_image=bool(row.image), **variations)
        length = valid_length(text_labels, audio_labels)
        if text_labels[:length].eq(mo.IGNORE).all() and audio_labels[:, :length].eq(mo.IGNORE).all():
            raise BadRow.at(row.file, row.row, "conversations", f"the reply starts after --max_seq_len "
                            f"{self.max_len} tokens, so nothing of it is learned")
        if self.scheduled_sampling > 0:
            noise = torch.Generator().manual_seed(rng.getrandbits(63))
            input_ids = scheduled_sampling(input_ids, text_labels, audio_labels, self.scheduled_sampling,
                                              generator=noise)
        spk = None if row.spk_emb is None else torch.from_numpy(row.spk_emb)
        return Sample(input_ids, text_labels, audio_labels, length, speech, pixels, spk, speech_cached, image_cached)

    def question_features(self, row, audio_bytes, rng):
        """Audio-file bytes of the question -> (L, 560) features (augmented when training asks for it)."""
        try:
            wav = files.load_audio(audio_bytes, SPEECH_RATE)  # any format soundfile reads; stereo -> mono
            if self.wave_augment:
                wav = augment_wave(wav, rng, np.random.default_rng(rng.getrandbits(63)))
            feats = mo.speech_features(self.encoders.speech_frontend, wav)  # the CPU half of SenseVoice
        except ValueError as e:
            raise BadRow.at(row.file, row.row, "question_audios", str(e)) from None
        return augment_features(feats, rng) if self.spec_augment else feats

    def image_pixels(self, row):
        """Image bytes -> (3, 256, 256) SigLIP2 input (any format PIL reads, made RGB)."""
        try:
            return mo.image_pixels(self.encoders.image_processor, [files.open_image(row.image)])[0]
        except ValueError as e:
            raise BadRow.at(row.file, row.row, "image_bytes", str(e)) from None


# -----------------------------------------------------------------------------------------------
# 6. Batches: a seeded order per epoch, padded to the longest sample in the batch
# -----------------------------------------------------------------------------------------------

class EpochBatches(Sampler):
    """This process's batches of one epoch. The order is a permutation seeded by (seed, epoch), split
    evenly across processes, so batch k of epoch e is the same rows in every run: resuming at batch
    `skip` continues the exact sequence. With `lengths` (--group_by_length) each process's rows are
    then grouped by length (see grouped_by_length)."""

    def __init__(self, n_rows, batch_size, seed, epoch, rank=0, world=1, skip=0, lengths=None):
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n_rows, generator=generator)
        per_rank = n_rows // world  # every process gets the same number of batches
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        batches = mine.split(batch_size) if lengths is None else grouped_by_length(mine, lengths, batch_size, generator)
        self.batches = batches[skip:]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return (b.tolist() for b in self.batches)


def batches_per_epoch(n_rows, batch_size, world):
    return math.ceil((n_rows // world) / batch_size)


# --group_by_length. A batch is padded to its longest sample, so a batch of one long and three short
# samples computes four long ones. Grouping puts rows of similar length together: the rows (already
# in their seeded order) are taken GROUP_BATCHES batches at a time, sorted by length within that
# window and cut into batches; then the batches are shuffled, so that the steps do not run from
# long to short. The window keeps the grouping local: every part of the data still reaches the
# model in every stretch of the epoch. The generator is the one that drew the order, seeded alike in
# every process, and every process has as many batches: at each step the processes take batches of
# the same rank in their windows (but for the one moved first), of similar lengths, so none waits long
# for the others. The full batch with the longest sample goes first: a run that does not fit in memory
# stops at its first step, not hours in.

GROUP_BATCHES = 64              # batches per window sorted by length
SPEECH_FRAMES_PER_S = 100 / 6   # SenseVoice's input: 10 ms fbank frames, stacked six at a time (LFR)


def estimated_lengths(rows, tok, max_len):
    """(N,) about how long each row's sample will be, for --group_by_length, read from the parquet
    columns without building the samples: the rendered conversation's tokens, its last reply counted
    as long as its speech when that is longer (the codes run alongside the reply, up to N_CODEBOOKS + 1
    steps behind), the question audio's encoder frames and an image's tokens. Cutting and the
    per-sample variations are not predicted: an estimate only decides which rows share a batch, never
    what a sample holds. A row that cannot be read counts as max_len (it will be replaced or stop the run)."""
    return torch.tensor([min(max_len, estimated_length(table, r, tok, max_len))
                         for _, table in rows.tables for r in range(len(table))])


def estimated_length(table, r, tok, max_len):
    """Row r of one parquet table: see estimated_lengths."""
    cell = lambda name: table.column(name)[r] if name in table.column_names else None
    try:
        turns = json.loads(cell("conversations").as_py())
        reply = next(t["content"] for t in reversed(turns) if t["role"] == "assistant")
        length = len(mo.encode(tok, mo.render_chat(turns)))
        answers, questions = items(cell("answer_audios")), items(cell("question_audios"))
        if answers:  # the reply's columns: as many as its text or as its speech (+ stop and delays)
            reply_tokens = len(mo.encode(tok, reply))
            length += max(0, len(answers[-1].values) // mo.N_CODEBOOKS + mo.N_CODEBOOKS + 1 - reply_tokens)
        if questions and questions[-1].as_py():
            length += round(sf.info(io.BytesIO(questions[-1].as_py())).duration * SPEECH_FRAMES_PER_S)
        image = cell("image_bytes")  # bytes, or a list of them
        if image is not None and image.is_valid and (not isinstance(image, pa.ListScalar) or len(image.values)):
            length += mo.IMAGE_TOKENS
    except (TypeError, ValueError, KeyError, StopIteration, AttributeError, RuntimeError):
        return max_len
    return length


def grouped_by_length(rows, lengths, batch_size, generator):
    """rows (N,) row indices in their seeded order, lengths (all rows,) -> batches (tuple of (<=
    batch_size,) tensors) of similar lengths: sorted within windows of GROUP_BATCHES batches, the
    full batches shuffled by `generator`, the longest first; a last partial batch stays last."""
    window = batch_size * GROUP_BATCHES
    by_length = [w[lengths[w].argsort(descending=True, stable=True)] for w in rows.split(window)]
    batches = torch.cat(by_length).split(batch_size) if len(rows) else ()
    full = [batches[i] for i in torch.randperm(len(rows) // batch_size, generator=generator)]
    if full:
        longest = max(range(len(full)), key=lambda i: int(lengths[full[i]].max()))
        full.insert(0, full.pop(longest))
    return tuple(full) + batches[len(full):]


@dataclass
class EncoderWork:
    """A batch's work for one frozen encoder: the inputs it has to encode, and what --encoder_cache
    holds for the other samples, with the keys to store the new outputs under."""
    inputs: Optional[torch.Tensor]  # (N, L, 560) zero-padded features or (N, 3, 256, 256) pixels; None: all stored
    encode: torch.Tensor            # (B,) bool: the N samples whose inputs are in `inputs`
    stored: Optional[torch.Tensor]  # (B, L', D) float16 zero-padded outputs read from the cache, or None
    keys: list                      # (B,) where to store each newly encoded output (a cache miss), else None


@dataclass
class Batch:
    input_ids: torch.Tensor                 # (B, 9, T), T = the longest sample
    text_labels: torch.Tensor               # (B, T)
    audio_labels: torch.Tensor              # (B, 8, T)
    speech: Optional[EncoderWork]           # the questions, for SenseVoice; None when no sample has one
    speech_lengths: Optional[torch.Tensor]  # (B,) question lengths (encoded or stored), 0 where there is none
    image: Optional[EncoderWork]            # the images, for SigLIP2; None when no sample has one
    spk_emb: Optional[torch.Tensor]         # (B, 192), zeros where a sample has none (it has no slot then)
    tokens: int                             # positions up to each sample's valid length
    bad_rows: list                          # messages of rows left out (--skip_bad_rows)

    def to(self, device):
        """The batch on `device`; from pinned memory (see pin_memory) the copy overlaps the GPU's work."""
        return each_tensor(self, lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):
        """The batch in page-locked memory (the DataLoader calls this on CUDA), which a GPU copies from asynchronously."""
        return each_tensor(self, torch.Tensor.pin_memory)


def each_tensor(x, f):
    """x with f applied to every tensor in it: a tensor, or a dataclass (Batch, EncoderWork) field by field."""
    if isinstance(x, torch.Tensor):
        return f(x)
    if is_dataclass(x):
        return replace(x, **{k: each_tensor(v, f) for k, v in vars(x).items()})
    return x


def encoder_work(inputs, cached, batch_inputs):
    """One encoder's EncoderWork from each sample's input to encode (or None) and its Cached entry;
    None when no sample has anything for this encoder. batch_inputs: the N inputs -> one tensor."""
    stored = [c.output for c in cached]
    encode = torch.tensor([x is not None for x in inputs])
    if not encode.any() and all(o is None for o in stored):
        return None
    return EncoderWork(inputs=batch_inputs([x for x in inputs if x is not None]) if encode.any() else None,
                       encode=encode, stored=pad_stored(stored), keys=[c.key for c in cached])


def pad_stored(outputs):
    """Per-sample outputs read from the cache ((L_i, D) float16, or None) -> (B, L, D) zero-padded, kept
    in float16 (half the bytes to move to the device), or None when none was stored."""
    found = [o for o in outputs if o is not None]
    if not found:
        return None
    return mo.pad_features(outputs, found[0].shape[-1], "cpu")[0].to(CACHE_DTYPE)


def pad_speech(feats):
    """(L_i, 560) features -> (N, L, 560) zero-padded."""
    return mo.pad_features(feats, mo.SPEECH_FEAT_DIM, "cpu")[0]


def collate(samples, width_multiple=1):
    """Samples -> Batch. Each sample was built at max_len; the batch keeps only the first T positions,
    T = the longest valid length in the batch (not max_len: most samples are much shorter), rounded up
    to a multiple of width_multiple (at most the samples' length): --compile then sees a few widths.
    Positions after a sample's valid length have no labels and, attention being causal, change nothing
    before them (only a MoE's load-balance loss, averaged over every position, sees them). A bad row
    (without --skip_bad_rows) comes back as its BadRow, for the loop to raise."""
    bad = [s for s in samples if isinstance(s, BadRow)]
    if bad:
        return bad[0]
    longest = max(s.length for s in samples)
    T = min(math.ceil(longest / width_multiple) * width_multiple, samples[0].input_ids.shape[-1])
    stack = lambda name: torch.stack([getattr(s, name)[..., :T] for s in samples])
    speech = encoder_work([s.speech for s in samples], [s.speech_cached for s in samples], pad_speech)
    questions = [s.speech if s.speech is not None else s.speech_cached.output for s in samples]  # features or outputs
    spk = None
    if any(s.spk_emb is not None for s in samples):
        spk = torch.stack([s.spk_emb if s.spk_emb is not None else torch.zeros(mo.OmniConfig.spk_emb_size)
                           for s in samples])
    return Batch(stack("input_ids"), stack("text_labels"), stack("audio_labels"), speech=speech,
                 speech_lengths=None if speech is None else torch.tensor([0 if q is None else len(q) for q in questions]),
                 image=encoder_work([s.pixels for s in samples], [s.image_cached for s in samples], torch.stack),
                 spk_emb=spk, tokens=sum(s.length for s in samples), bad_rows=sum((s.skipped for s in samples), []))


# -----------------------------------------------------------------------------------------------
# 7. Demo data: a small T2A set in the official schema, made on the fly
# -----------------------------------------------------------------------------------------------
# Questions about sums and colours, answered in text and in "speech": Mimi-like codes where each
# character of the answer is one frame, looked up in a random table and shifted per voice. Simple
# enough that a tiny model learns it in a couple of minutes on a CPU, yet every column, the voice
# prompt, the speaker slot and multi-turn cutting are exercised exactly as with the real data.

DEMO_ROWS = 512
DEMO_VOICES = 4
DEMO_REF_FRAMES = 6
DEMO_MULTI_TURN = 0.25       # share of rows with two question/answer exchanges
DEMO_COLOURS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "night": "black", "rose": "red"}


def demo_exchange(rng):
    if rng.random() < 0.5:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    thing = rng.choice(sorted(DEMO_COLOURS))
    return f"What colour is the {thing}?", f"The {thing} is {DEMO_COLOURS[thing]}."


def write_demo_data(path, rows=DEMO_ROWS, seed=0):
    """Write the demo parquet file (conversations, answer_audios, ref_audios, spk_emb); returns path."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    char_frames = np_rng.integers(0, mo.CODEBOOK_SIZE, (128, mo.N_CODEBOOKS))       # one frame per ASCII char
    voices = [(np_rng.integers(0, mo.CODEBOOK_SIZE, DEMO_REF_FRAMES * mo.N_CODEBOOKS),  # reference codes
               np_rng.standard_normal(mo.OmniConfig.spk_emb_size).astype(np.float32))  # speaker embedding
              for _ in range(DEMO_VOICES)]
    speak = lambda text, v: ((char_frames[[ord(c) % 128 for c in text]] + 97 * v) % mo.CODEBOOK_SIZE).flatten()
    columns = {"conversations": [], "answer_audios": [], "ref_audios": [], "spk_emb": []}
    for _ in range(rows):
        v = rng.randrange(DEMO_VOICES)
        turns, answers = [], []
        for _ in range(2 if rng.random() < DEMO_MULTI_TURN else 1):
            question, answer = demo_exchange(rng)
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            answers.append(speak(answer, v).tolist())
        columns["conversations"].append(json.dumps(turns, ensure_ascii=False))
        columns["answer_audios"].append(answers)
        columns["ref_audios"].append(voices[v][0].tolist())
        columns["spk_emb"].append(voices[v][1].tolist())
    schema = pa.schema([("conversations", pa.string()), ("answer_audios", pa.list_(pa.list_(pa.int32()))),
                        ("ref_audios", pa.list_(pa.int32())), ("spk_emb", pa.list_(pa.float32()))])
    with files.atomic_path(path) as tmp:
        pq.write_table(pa.table(columns, schema=schema), tmp)
    return path


# -----------------------------------------------------------------------------------------------
# 8. Model, optimizer and learning-rate schedule
# -----------------------------------------------------------------------------------------------

def build_model(args):
    """Random weights, the text-only MiniMind (the Talker then starts as a copy of the last Thinker
    blocks), or a previous stage's checkpoint. A missing file says where the published one is."""
    torch.manual_seed(args.seed)  # random init (the whole model, or the parts a checkpoint lacks)
    if args.from_weight == "none":
        cfg = mo.OmniConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                            talker_hidden_size=args.hidden_size, num_talker_hidden_layers=args.num_hidden_layers // 2,
                            use_moe=args.use_moe)
        return mo.MiniMindO(cfg)
    state = files.read_checkpoint(args.from_weight)
    model = mo.MiniMindO(files.checkpoint_config(args.from_weight, state))
    if any(k.startswith("talker.") for k in state):
        model.load_official_state_dict(state)
    else:
        start_from_text_model(model, state)
    if args.use_moe and not model.config.use_moe:
        raise ValueError(f"--use_moe, but {args.from_weight} holds a dense model; start from a MoE checkpoint "
                         "(sft_omni_768_moe.pth) or --from_weight none")
    return model


def start_from_text_model(model, state_dict):
    """Start from the text-only MiniMind (`llm_768.pth`: `model.*` and `lm_head.weight`).

    The Thinker loads strictly. When the widths match, Talker block i starts as a copy of Thinker
    block n_thinker - n_talker + i: the last Thinker blocks already know how to read the text."""
    other = [k for k in state_dict if not k.startswith("model.") and k != "lm_head.weight"]
    if other:
        raise ValueError(f"not a MiniMind checkpoint: it has {other[0]!r} and {len(other) - 1} more keys that are "
                         "neither model.* (the Thinker) nor talker.*")
    thinker = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    model.thinker.load_state_dict(thinker)
    if "lm_head.weight" in state_dict:  # tied to the embedding, so a checkpoint may leave it out
        with torch.no_grad():
            model.lm_head.weight.copy_(state_dict["lm_head.weight"])
    cfg = model.config
    if cfg.talker_hidden_size == cfg.hidden_size:
        offset = cfg.num_hidden_layers - cfg.num_talker_hidden_layers
        for i, block in enumerate(model.talker.layers):
            block.load_state_dict(model.thinker.layers[offset + i].state_dict())


def set_trainable(model, mode):
    """mode 'all' trains everything; 'audio_proj' / 'vision_proj' only that projector (the release
    aligns a new input this way before fine-tuning the whole model on it)."""
    only = {"all": None, "audio_proj": model.audio_proj, "vision_proj": model.vision_proj}[mode]
    for p in model.parameters():
        p.requires_grad_(only is None)
    if only is not None:
        only.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step, total, peak):
    """The release's cosine over optimizer steps 1..total: just under peak at the first, peak/10 at the last."""
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total, 1))))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class Learner:
    """The model and what trains it."""
    model: mo.MiniMindO              # its weights are what is saved
    net: torch.nn.Module             # what a step calls: the model, maybe in DDP
    params: list                     # the trainable parameters (--mode)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # loss scaling, enabled for float16 only
    autocast: object                 # the bf16/fp16 autocast context, or a null context (float32)


def build_learner(args, procs, resume):
    """The Learner, fresh (see build_model) or as the resume state left it, and the position to start
    from (resuming also restores the random states)."""
    model = build_model(args) if resume is None else resumed_model(resume)
    model.to(procs.device).train()
    model.thinker.checkpointing = model.talker.checkpointing = args.grad_checkpointing
    params = set_trainable(model, args.mode)
    dtype = getattr(torch, args.dtype)
    # fused: one kernel updates every parameter instead of a loop of small ones (several times faster on a CPU)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    autocast = torch.autocast(procs.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    learner = Learner(model, model, params, optimizer, scaler, autocast)
    if args.compile:  # the block stacks: their widths are few; the heads' are the batch's number of labels
        model.width_multiple = COMPILE_WIDTH
        thinker = model.thinker
        thinker.lower, thinker.upper = compiled(thinker.lower, args), compiled(thinker.upper, args)
        model.talker.forward = compiled(model.talker.forward, args)
    position = dict(epoch=0, batch=0, step=0, bad_rows=[], seconds=0.0)  # bad_rows: messages of skipped rows
    if resume is not None:
        position = restore(learner, resume, procs)
    if procs.world > 1:  # a T2A batch leaves the projectors unused, a MoE batch some experts: both are fine
        gpu = [procs.device.index] if procs.device.type == "cuda" else None
        learner.net = DistributedDataParallel(learner.net, device_ids=gpu, find_unused_parameters=True)
    return learner, position


def compiled(net, args):
    """--compile: torch.compile with static shapes, one graph per batch shape. Batch widths are multiples
    of COMPILE_WIDTH up to max_seq_len (see collate), batch sizes are --batch_size and the epoch's last,
    smaller batch: dynamo may keep that many graphs (its default limit, 8, would fall back to eager)."""
    widths = math.ceil(args.max_seq_len / COMPILE_WIDTH)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * widths)
    return torch.compile(net, dynamic=False)


# -----------------------------------------------------------------------------------------------
# 9. Checkpoints and exact resume
# -----------------------------------------------------------------------------------------------
# Two files: the weights in the release's fp16 layout (what chat.py and files.load_model read,
# and what the next stage starts from), and the resume state (fp32 weights, optimizer, scaler,
# position, random states). Both are written to a temporary file and renamed: a kill never leaves
# half a checkpoint behind.

RESUME_MUST_MATCH = ("data", "mode", "max_seq_len", "batch_size", "accumulation_steps", "epochs", "max_steps", "seed",
                     "learning_rate", "weight_decay", "grad_clip", "augment", "scheduled_sampling", "group_by_length")


def run_file(args, name):
    """<out_dir>/<save_weight>_<name>: where each file of this run goes."""
    return os.path.join(args.out_dir, f"{args.save_weight}_{name}")


def weight_path(args, cfg):
    return run_file(args, f"{cfg.hidden_size}{'_moe' if cfg.use_moe else ''}.pth")


def resume_path(args):
    return run_file(args, "resume.pt")


class OutputInUse(ValueError):
    """Another live run writes the same --out_dir/--save_weight files."""


@contextlib.contextmanager
def output_lock(args, procs):
    """Hold <out_dir>/<save_weight>.lock (rank 0) for the whole run: a second run on the same outputs
    would interleave their metrics and leave a checkpoint of neither, so it is refused at start. The
    lock is the kernel's (flock): it dies with its process, so a killed run's lock file is simply taken
    over. The file holds the owner's pid, for the message. Under the lock, temporary files that killed
    runs left beside this run's outputs are removed."""
    if not procs.is_main:
        yield
        return
    path = os.path.join(args.out_dir, f"{args.save_weight}.lock")
    f = take_lock(path)
    try:
        for leftover in glob.glob(os.path.join(glob.escape(args.out_dir), f".{glob.escape(args.save_weight)}_*.tmp*")):
            os.remove(leftover)  # files.atomic_path's temporary names: .<file>.<hex>.tmp<ext>
        yield
    finally:
        os.remove(path)  # while still holding it: a run that opened it meanwhile finds it locked, then gone
        f.close()


def take_lock(path):
    """The open, locked lock file at `path`, with this process's pid in it; OutputInUse when a live
    process holds it."""
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:
            raise write_failed(path, e, "Nothing was trained") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise OutputInUse(f"{path} is held by another training run (pid {owner}) writing the same --out_dir "
                              "and --save_weight; wait for it to finish, or choose another --save_weight or "
                              "--out_dir") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            break
        f.close()  # its owner removed it between our open and our lock: try again
    try:  # unbuffered: nothing is left to fail again when f closes
        os.ftruncate(f.fileno(), 0)
        os.write(f.fileno(), f"{os.getpid()}\n".encode())
    except OSError as e:
        os.remove(path)  # while holding it, as output_lock does
        f.close()
        raise write_failed(path, e, "Nothing was trained") from e
    return f


def rng_states(device):
    states = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if device.type == "cuda":  # this process's GPU only: touching the others would give each a context
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def save_resume_state(path, learner, position, args, procs):
    model = learner.model
    state = dict(model=model.state_dict(), config=asdict(model.config), optimizer=learner.optimizer.state_dict(),
                 scaler=learner.scaler.state_dict(), position=position, rng=rng_states(procs.device),
                 args={k: resume_setting(args, k) for k in RESUME_MUST_MATCH}, world=procs.world)
    with files.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume_state(path, args, world):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no resume state at {path} (it is written every --save_every steps "
                                "by a run with the same --out_dir and --save_weight)")
    try:  # our own file: RNG states are not tensors
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut short, overwritten: not torch.save's whole file
        raise ValueError(f"--resume: cannot read {path} ({(str(e).splitlines() or [''])[0][:120]}): it is damaged. "
                         "Start afresh without --resume (the weights of its last save are in "
                         f"{os.path.basename(path).replace('_resume.pt', '_<hidden>.pth')}, for --from_weight)") from e
    saved = lambda k: state["args"].get(k, False)  # a setting added since the file was written: it was off
    changed = [f"--{k} {saved(k)} -> {resume_setting(args, k)}" for k in RESUME_MUST_MATCH
               if saved(k) != resume_setting(args, k)]
    if state["world"] != world:
        changed.append(f"processes {state['world']} -> {world}")
    if changed:
        raise ValueError(f"--resume: {path} belongs to a different run ({'; '.join(changed)}); resume with the "
                         "original settings, or start afresh without --resume")
    return state


def resume_setting(args, name):
    """A setting as the resume state keeps it: the data files by what they are (real path and size), not
    by how the command spelled them (data.parquet, ./data.parquet, a link to it)."""
    if name == "data":
        return [f"{os.path.realpath(p)} ({os.path.getsize(p)} bytes)" for p in args.data]
    return getattr(args, name)


def resumed_model(resume):
    model = mo.MiniMindO(mo.OmniConfig(**resume["config"]))
    model.load_state_dict(resume["model"])
    return model


def restore(learner, resume, procs):
    """Put the optimizer, the loss scaler and the random states back as the resume state holds them;
    returns the position it was written at."""
    learner.optimizer.load_state_dict(resume["optimizer"])
    learner.scaler.load_state_dict(resume["scaler"])
    set_rng_states(resume["rng"], procs.device)
    # rank 0 carries on the run's skipped rows (see save()), the others collect afresh
    return dict(resume["position"], bad_rows=resume["position"]["bad_rows"] if procs.is_main else [])


def save(args, procs, learner, position, seconds):
    """Write the weights and the resume state (rank 0, with every process's skipped rows); returns how
    many rows were skipped. seconds(): the run's time so far."""
    bad_rows = procs.union(position["bad_rows"])
    if procs.is_main:
        path = weight_path(args, learner.model.config)
        try:
            files.save_checkpoint(learner.model, path)
            path = resume_path(args)
            save_resume_state(path, learner, dict(position, bad_rows=bad_rows, seconds=seconds()), args, procs)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise write_failed(path, e, "The previous file there is kept whole") from e
    return len(bad_rows)


class SaveFailed(OSError):
    """A file of the run could not be written (full disk, no permission); what was there before is intact."""


def write_failed(path, error, outcome=""):
    """The SaveFailed for `path`: the error's first line and the space left on its disk."""
    folder = os.path.dirname(path) or "."
    free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free" if os.path.isdir(folder) else "no such folder"
    return SaveFailed(f"cannot write {path}: {(str(error).splitlines() or [''])[0]} ({free} on its disk: is it full, "
                      f"or not writable?). {outcome}".rstrip())


# -----------------------------------------------------------------------------------------------
# 10. The training loop
# -----------------------------------------------------------------------------------------------

def encode_inputs(batch, encoders):
    """Frozen encoders on the device: questions -> (B, L, 512), images -> (B, 64, 768); None where the
    batch has none."""
    audio = image = None
    with torch.no_grad():
        if batch.speech is not None:
            lengths = batch.speech_lengths
            audio = encoder_outputs(batch.speech, mo.SPEECH_EMBED_DIM, encoders.speech_cache, lengths,
                                    lambda x: run_speech_encoder(encoders.speech, x, lengths[batch.speech.encode]))
        if batch.image is not None:
            image = encoder_outputs(batch.image, mo.IMAGE_EMBED_DIM, encoders.image_cache, None,
                                    lambda x: run_vision_encoder(encoders.vision, x))
    return audio, image


def encoder_outputs(work, dim, cache, lengths, encode):
    """(B, L, dim) outputs of one frozen encoder: those read from --encoder_cache as they are, the
    others from one call encode(work.inputs), then stored where the cache missed (outputs[b, :lengths[b]];
    all of outputs[b] without lengths)."""
    fresh = None if work.inputs is None else as_stored(encode(work.inputs), cache)
    width = max(x.shape[1] for x in (fresh, work.stored) if x is not None)
    outputs = torch.zeros(len(work.encode), width, dim, device=work.encode.device)
    if work.stored is not None:
        outputs[:, :work.stored.shape[1]] = work.stored
    if fresh is not None:
        outputs[work.encode, :fresh.shape[1]] = fresh
    if cache is not None:
        cache.put_batch(work.keys, outputs, lengths)
    return outputs


def as_stored(outputs, cache):
    """Fresh outputs as float32; with a cache first rounded to its float16, so a step is the same
    whether they were just computed or read back (and resume stays exact)."""
    return outputs.to(CACHE_DTYPE).float() if cache is not None else outputs.float()


def idle_inputs(batch, audio, image, mode):
    """In --mode audio_proj / vision_proj the projector is all that trains, so it must take part in every
    step, even when a batch has nothing for it (no question audio, no image): otherwise the loss has no
    gradient to follow. It is given a zero-length question or a zero image, which injects nothing (the
    batch has no placeholder for it). In --mode all an idle projector simply gets no gradient, as in
    the release."""
    B, device = len(batch.input_ids), batch.input_ids.device
    lengths = batch.speech_lengths
    if audio is None and mode == "audio_proj":
        audio = torch.zeros(B, 1, mo.SPEECH_EMBED_DIM, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
    if image is None and mode == "vision_proj":
        image = torch.zeros(B, mo.IMAGE_TOKENS, mo.IMAGE_EMBED_DIM, device=device)
    return audio, lengths, image


def micro_step(net, batch, encoders, autocast, scale, mode):
    """Forward and backward of one micro-batch through net (the model, maybe wrapped): its labelled forward
    gives the losses. Returns the unscaled (loss, text, audio, aux) values."""
    with autocast:
        audio, audio_lengths, image = idle_inputs(batch, *encode_inputs(batch, encoders), mode)
        losses = net(batch.input_ids, audio_embeds=audio, image_embeds=image, spk_emb=batch.spk_emb,
                     audio_lengths=audio_lengths, text_labels=batch.text_labels, audio_labels=batch.audio_labels)
        loss = sum(losses)  # text + audio + aux
    scale(loss).backward()
    return torch.stack([loss, *losses]).detach()


def optimizer_step(learner, batches, group_size, encoders, args, world):
    """One optimizer step: forward and backward of group_size micro-batches from `batches`, their
    gradients summed, then clipping and the update. Returns the step's (7,) sums on the CPU: loss,
    text, audio and aux (each the mean over the micro-batches), tokens, samples and the positions
    computed (tokens and padding)."""
    sums = torch.zeros(7)
    for i in range(group_size):
        batch = next(batches)
        last = i == group_size - 1  # DDP averages gradients only after the last micro-batch
        with contextlib.nullcontext() if last or world == 1 else learner.net.no_sync():
            values = micro_step(learner.net, batch, encoders, learner.autocast,
                                lambda x: learner.scaler.scale(x / group_size), args.mode)
        sizes = torch.tensor([batch.tokens, len(batch.input_ids), batch.text_labels.numel()])
        sums += torch.cat([values.float().cpu() / group_size, sizes])
    if not torch.isfinite(sums[0]):
        raise NotFinite("the loss is not a number (NaN or infinite)")
    learner.scaler.unscale_(learner.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(learner.params, args.grad_clip)
    if not learner.scaler.is_enabled() and not torch.isfinite(norm):  # float16's scaler skips such a step itself
        raise NotFinite("the gradient norm is not a number (NaN or infinite)")
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    return sums


def epoch_batches(dataset, args, procs, position, lengths=None):
    """This process's batches of the position's epoch, from its batch on, checked and on the device.
    lengths: estimated_lengths, to group the rows by (--group_by_length)."""
    dataset.epoch = position["epoch"]  # before the DataLoader starts its workers
    sampler = EpochBatches(len(dataset), args.batch_size, args.seed, position["epoch"], procs.rank, procs.world,
                           position["batch"], lengths)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                             collate_fn=functools.partial(collate, width_multiple=COMPILE_WIDTH if args.compile else 1),
                             pin_memory=procs.device.type == "cuda"))
    return (checked(batch, position).to(procs.device) for batch in loader)


def checked(batch, position):
    """The batch, unless it is a bad row's BadRow: that stops the run. Rows it skipped instead
    (--skip_bad_rows) are reported once and kept in position["bad_rows"]."""
    if isinstance(batch, BadRow):
        raise batch
    for message in batch.bad_rows:  # every process reports its own, once (not again each epoch)
        if message not in position["bad_rows"]:
            tqdm.write(f"skipped bad row: {message}")
            position["bad_rows"].append(message)
    return batch


class MetricsLog:
    """One JSON line per logged step; on resume, lines after the resumed step are dropped (they
    will be written again)."""

    def __init__(self, path, resume_step=None):
        self.path = path
        kept = []
        if resume_step is not None and os.path.exists(path):
            kept = [line for line in self.lines() if json.loads(line)["step"] <= resume_step]
        try:
            with files.atomic_path(path) as tmp, open(tmp, "w") as f:
                f.writelines(kept)
        except OSError as e:
            raise write_failed(path, e, "Nothing was trained") from e

    def lines(self):
        """The file's whole lines. A kill mid-write can leave the last one cut off: it is dropped (that step
        is written again); any other line that is not JSON is an error naming the file and line."""
        with open(self.path) as f:
            lines = f.readlines()
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)["step"]
            except (json.JSONDecodeError, TypeError, KeyError):
                if number == len(lines) and not line.endswith("\n"):
                    return lines[:-1]
                raise ValueError(f"{self.path}, line {number}: not a metrics record ({line.strip()[:80]!r})") from None
        return lines

    def write(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # the lines before stay: each was written whole, closed, on its own
            raise write_failed(self.path, e, "Its lines before this step are kept") from e

    def records(self):
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def plot(self, png, title):
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        records = self.records()
        if not records:
            return None
        steps = [r["step"] for r in records]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key in ("loss", "text", "audio"):
            ax.plot(steps, [r[key] for r in records], label=key)
        ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with files.atomic_path(png) as tmp:  # the format follows the extension, which tmp keeps
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        return png


class Progress:
    """The run's clock, and on rank 0 its progress bar and metrics file."""

    def __init__(self, args, procs, position, total_steps, resuming):
        self.procs = procs
        metrics = run_file(args, "metrics.jsonl")
        self.log = MetricsLog(metrics, position["step"] if resuming else None) if procs.is_main else None
        self.bar = tqdm(total=total_steps, initial=position["step"], disable=not procs.is_main, dynamic_ncols=True,
                        unit="step", mininterval=0)  # drawn after every step, however short (tqdm's default: 0.1 s)
        self.started = time.time() - position["seconds"]

    def seconds(self):
        return time.time() - self.started

    def record(self, sums, position, lr, tick):
        """One metrics line and the bar's numbers, from a step's (7,) sums (see optimizer_step) of every
        process; tick: when the step began."""
        sums = self.procs.sum(sums)
        loss, text, audio, aux = (sums[:4] / self.procs.world).tolist()
        seconds = time.time() - tick
        if self.procs.is_main:
            self.log.write(dict(step=position["step"], epoch=position["epoch"], loss=loss, text=text, audio=audio,
                                aux=aux, lr=lr, samples_per_s=sums[5].item() / seconds,
                                tokens_per_s=sums[4].item() / seconds, padding=1 - sums[4].item() / sums[6].item(),
                                elapsed_s=self.seconds()))
            self.bar.set_postfix(loss=f"{loss:.3f}", text=f"{text:.3f}", audio=f"{audio:.3f}", lr=f"{lr:.2e}",
                                 refresh=False)  # the step's update() draws the bar: once a step


def tokenizer_folder(args):
    """--tokenizer, else the --from_weight folder (release folders ship it), else TOKENIZER.place, fetched
    there (about 450 KB) when it is missing and the hub can be reached."""
    if args.tokenizer:
        return args.tokenizer
    start = getattr(args, "from_weight", None)
    if start and os.path.isfile(os.path.join(start, "tokenizer.json")):
        return start
    folder = os.path.join(HERE, TOKENIZER.place)
    for failure in files.download(argparse.Namespace(tokenizer=folder), ["tokenizer"]):
        tqdm.write(failure)  # offline, refused, cut off: the error below says how to get it by hand
    if not TOKENIZER.present(folder):
        raise FileNotFoundError(f"no tokenizer in {folder}: training needs the released MiniMind tokenizer. Get it "
                                f"with\n  {TOKENIZER.download[0]}\nor point --tokenizer at a folder that has tokenizer.json")
    return folder


def published_weights(path):
    """How to get a published .pth (llm_768.pth, sft_omni_768.pth ...) to `path`, or the release folder."""
    if not path.endswith(".pth"):
        return files.PARTS["checkpoint"].how
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    return (f"`modelscope download --model gongjy/minimind-3o-pytorch {name} --local_dir {folder}` or "
            f"`hf download jingyaogong/minimind-3o-pytorch {name} --local-dir {folder}`")


def missing_inputs(args):
    """Every input file that is not there (tokenizer, data, start weights), as one message, or None: a
    first run learns all it has to download at once, not one file per attempt."""
    missing = []
    try:
        tokenizer_folder(args)
    except FileNotFoundError as e:
        missing.append(str(e))
    missing += [f"data file not found: {p} ({PUBLISHED_DATA})" for p in args.data if not os.path.exists(p)]
    if args.from_weight != "none" and not args.resume and files.weights_file(args.from_weight) is None:
        missing.append(f"--from_weight {args.from_weight} not found; get the published weights with "
                       f"{published_weights(args.from_weight)}")
    return "\n".join(missing) or None


def prepare_data(args, procs):
    """The OmniDataset of --data: every input file checked first, then the rows, the encoders they need
    and (--encoder_cache) their caches."""
    missing = missing_inputs(args)
    if missing:
        raise FileNotFoundError(missing)
    tok = mo.load_tokenizer(tokenizer_folder(args))
    rows = ParquetRows(args.data)
    if len(rows) < procs.world:
        raise ValueError(f"{len(rows)} rows cannot be shared by {procs.world} processes")
    needs = {"audio_proj": "question_audios", "vision_proj": "image_bytes"}.get(args.mode)
    if needs and not rows.has_any(needs):
        raise ValueError(f"--mode {args.mode} trains only that projector, but no row of {args.data} has {needs}")
    encoders = load_encoders(rows, args, procs.device)
    if args.encoder_cache:
        procs.say(open_caches(encoders, args))
    return OmniDataset(rows, tok, args.max_seq_len, encoders, args.augment, args.scheduled_sampling, args.seed,
                       args.skip_bad_rows)


def demo_data(args, procs):
    """The demo's parquet file in --out_dir: rank 0 writes it, the others wait for it."""
    path = os.path.join(args.out_dir, "demo_t2a.parquet")
    if procs.is_main:
        write_demo_data(path)
    if procs.world > 1:
        dist.barrier()
    return path


@dataclass
class Processes:
    """This process's place in the run: its rank of `world` processes (1 without torchrun), its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    def say(self, line):
        if self.is_main:
            tqdm.write(line)

    def sum(self, t):
        """t summed over the processes, on the device (NCCL reduces CUDA tensors only); returned on the CPU."""
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def union(self, items):
        """Every process's items, each once (rank 0's resume state keeps the union)."""
        if self.world == 1:
            return items
        gathered = [None] * self.world
        dist.all_gather_object(gathered, items)
        return sorted(set().union(*gathered))


def check_device(args):
    """--device names a device PyTorch has here and --dtype a precision it trains in (ValueError naming
    the flag otherwise); an unset --dtype becomes the device's default."""
    name = args.device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cuda, cuda:N, mps or cpu") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: train.py runs on cuda, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ValueError(f"--device {name}: PyTorch sees no CUDA GPU here (this PyTorch is {build}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there is no such GPU (PyTorch sees {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = "this PyTorch is built without MPS" if not torch.backends.mps.is_built() else "no Apple-silicon GPU"
        raise ValueError(f"--device {name}: MPS (an Apple-silicon Mac's GPU) is not available here ({why}); use "
                         "--device cpu")
    if device.type == "mps" and "RANK" in os.environ:
        raise ValueError(f"--device {name}: MPS trains in one process; under torchrun use --device cuda or cpu")
    if device.type == "cpu" and args.dtype == "float16":
        raise ValueError("--dtype float16: float16 training needs a GPU (CUDA or MPS); on the CPU use --dtype bfloat16 "
                         "or float32")
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")


def setup_processes(args):
    """Under torchrun each process joins the group and takes its own GPU."""
    if "RANK" not in os.environ:
        return Processes(0, 1, torch.device(args.device))
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def describe(learner, dataset, total_steps, args, procs):
    counts = mo.parameter_counts(learner.model)
    return (f"model: {counts['total']:.2f}M parameters (Thinker {counts['thinker']:.2f}M, Talker "
            f"{counts['talker']:.2f}M), training {sum(p.numel() for p in learner.params) / 1e6:.2f}M ({args.mode}); "
            f"data: {len(dataset)} rows in {len(args.data)} file(s); {total_steps} steps of "
            f"{args.batch_size}x{args.accumulation_steps}x{procs.world} samples on {procs.device}")


def train(args):
    """Run one training stage; returns a summary dict (also printed)."""
    procs = setup_processes(args)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise write_failed(args.out_dir, e, "Nothing was trained") from e
    with output_lock(args, procs):
        return train_stage(args, procs)


def train_stage(args, procs):
    """train() once this run holds its outputs."""
    demo = args.data is None
    if demo:
        tokenizer_folder(args)  # checked (fetched when possible) before the demo's data is written
        args.data = [demo_data(args, procs)]
    dataset = prepare_data(args, procs)
    n_batches = batches_per_epoch(len(dataset), args.batch_size, procs.world)
    total_steps = min(math.ceil(n_batches / args.accumulation_steps) * args.epochs, args.max_steps or math.inf)
    resume = load_resume_state(resume_path(args), args, procs.world) if args.resume else None
    learner, position = build_learner(args, procs, resume)
    procs.say(describe(learner, dataset, total_steps, args, procs)
              + (f"; resuming after step {position['step']}" if resume else ""))
    if position["step"] >= total_steps:
        procs.say(f"--resume: this run already finished all {total_steps} steps; nothing left to train")
    progress = Progress(args, procs, position, total_steps, resume is not None)
    lengths = length_groups(dataset, args, procs) if args.group_by_length else None

    while position["epoch"] < args.epochs and position["step"] < total_steps:
        batches = epoch_batches(dataset, args, procs, position, lengths)
        while position["batch"] < n_batches and position["step"] < total_steps:
            lr = set_lr(learner.optimizer, lr_at(position["step"] + 1, total_steps, args.learning_rate))
            tick = time.time()
            group_size = min(args.accumulation_steps, n_batches - position["batch"])
            try:
                sums = optimizer_step(learner, batches, group_size, dataset.encoders, args, procs.world)
            except torch.OutOfMemoryError as e:
                raise OutOfMemory(memory_advice(e, args, procs, position["step"] + 1)) from None
            except NotFinite as e:
                raise NotFinite(f"step {position['step'] + 1}: {e}; it was not taken and training stopped, so the "
                                "saved weights are those of the last save before it") from None
            position["batch"] += group_size
            position["step"] += 1
            step = position["step"]
            # step 1 and the last are always logged: the final report compares their losses
            if step == 1 or step % args.log_every == 0 or step == total_steps:
                progress.record(sums, position, lr, tick)
            progress.bar.update(1)
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save(args, procs, learner, position, progress.seconds)
        if position["batch"] >= n_batches:
            position.update(epoch=position["epoch"] + 1, batch=0)
    return finish(args, procs, learner, position, progress, demo)


def length_groups(dataset, args, procs):
    """--group_by_length: every row's estimated length (each process computes the same)."""
    started = time.time()
    lengths = estimated_lengths(dataset.rows, dataset.tok, args.max_seq_len)
    procs.say(f"--group_by_length: estimated the length of {len(lengths)} rows in {time.time() - started:.1f} s "
              f"(median {int(lengths.median())} tokens)")
    return lengths


class NotFinite(ValueError):
    """A step whose loss or gradients are not numbers: it is not taken, and the run stops before its next
    save, so the weights on disk stay those of the last good one."""


class OutOfMemory(RuntimeError):
    """A training step did not fit in the device's memory; the message names settings that need less."""


def memory_advice(error, args, procs, step):
    """What ran out (the first two sentences of PyTorch's message), and the settings that need less memory."""
    said = ". ".join(str(error).split(". ")[:2]).strip().rstrip(".")
    settings = f"--batch_size {args.batch_size} --accumulation_steps {args.accumulation_steps} --max_seq_len " \
               f"{args.max_seq_len} --dtype {args.dtype}" + (" --grad_checkpointing" if args.grad_checkpointing else "")
    fits = []
    if args.batch_size > 1:  # the largest micro-batch of at most half as many that divides the batch
        half = max(d for d in range(1, args.batch_size // 2 + 1) if args.batch_size % d == 0)
        fits.append(f"--batch_size {half} --accumulation_steps {args.accumulation_steps * args.batch_size // half} "
                    f"(the same {args.batch_size * args.accumulation_steps} samples per optimizer step, so much the "
                    "same training, in more and smaller micro-batches)")
    if not args.grad_checkpointing:
        fits.append("--grad_checkpointing (the same training: each block is recomputed in the backward pass, "
                    "at most one more forward pass of the blocks)")
    if args.dtype == "float32" and procs.device.type != "cpu":
        fits.append("--dtype bfloat16 (about 30% less activation memory)")
    fits.append(f"--max_seq_len {max(MIN_SEQ_LEN, args.max_seq_len // 2)} (longer conversations are cut)")
    return (f"out of {procs.device.type} memory in step {step} ({said}) with {settings}. Each of these needs less: "
            + "; ".join(fits) + ". docs/performance.md, 'Memory', has a table of what fits in 8, 12, 16 and 24 GB")


def finish(args, procs, learner, position, progress, demo):
    """The last save, then on rank 0 the loss plot and the report; returns the summary."""
    progress.bar.close()
    summary = dict(steps=position["step"], seconds=progress.seconds(),
                   bad_rows=save(args, procs, learner, position, progress.seconds),
                   checkpoint=weight_path(args, learner.model.config), resume_state=resume_path(args))
    if procs.is_main:
        log = progress.log
        records = log.records()
        summary.update(first_loss=records[0]["loss"], last_loss=records[-1]["loss"], metrics=log.path,
                       padding=float(np.mean([r["padding"] for r in records])),
                       plot=log.plot(run_file(args, "loss.png"), plot_title(args, learner.model.config, demo)))
        report(summary, args, demo)
    if procs.world > 1:
        dist.destroy_process_group()
    return summary


def plot_title(args, cfg, demo):
    """What run the loss plot is of; the demo's says that its "audio" loss is made-up codes learned by heart."""
    data = "the demo's colour and sum questions" if demo else ", ".join(os.path.basename(p) for p in args.data)
    title = f"{args.save_weight}: {cfg.hidden_size}-wide model, --mode {args.mode}, on {data}"
    if demo:
        title += '\n"audio" is memorising made-up codes (one per character), not learning speech'
    return title


def report(summary, args, demo):
    lines = [f"trained {summary['steps']} steps in {summary['seconds']:.0f} s: loss {summary['first_loss']:.3f} -> "
             f"{summary['last_loss']:.3f}; {summary['padding']:.0%} of the positions computed were padding (logged steps)",
             f"weights:      {summary['checkpoint']}   (what files.load_model and chat.py --checkpoint read)",
             f"resume state: {summary['resume_state']}   (add --resume to the same command to continue)",
             f"metrics:      {summary['metrics']}, plot {summary['plot']}"]
    if summary["bad_rows"]:
        lines.append(f"skipped {summary['bad_rows']} bad rows (listed above)")
    if demo:
        lines = [f"demo: wrote {args.data[0]} ({DEMO_ROWS} T2A rows in the release's schema) and trained a "
                 f"{args.hidden_size}-wide model on it from random weights."] + lines + [
            "it was taught six colour questions, " + ", ".join(f'"What colour is the {thing}?"'
                                                              for thing in sorted(DEMO_COLOURS))
            + ', and sums of two digits ("What is 3 plus 4?").',
            "next: ask it what it was taught. It gets the colours right; sums come out in the right form but "
            "mostly wrong (a tiny model learns the format in minutes, not arithmetic). Its 'speech' is "
            "made-up codes, so ask for text only:",
            f'  python chat.py --checkpoint {summary["checkpoint"]} --tokenizer {tokenizer_folder(args)} --no_speech '
            '--greedy --text "What colour is the sky?"',
            "then train the real model: download llm_768.pth and sft_t2a_mini.parquet (README.md, 'Training "
            "recipes', has the commands) and run the mini recipe, starting with",
            "  python train.py --data dataset/sft_t2a_mini.parquet --from_weight out/llm_768.pth "
            "--save_weight sft_zero --batch_size 40 --max_seq_len 512"]
    tqdm.write("\n".join(lines))


# -----------------------------------------------------------------------------------------------
# 11. Data preparation: your own recordings -> parquet rows in the release's schema
# -----------------------------------------------------------------------------------------------
# python train.py --prepare MANIFEST OUT.parquet reads a JSON-lines manifest, one exchange a line:
#
#   {"question": "What is two plus three?", "answer": "Five.", "answer_audio": "a1.wav", "voice": "me.wav"}
#   {"question_audio": "q2.wav", "question": "Hi!", "answer": "Hello.", "answer_audio": "a2.wav"}
#   {"question": "What is this?", "image": "cat.png", "answer": "A cat.", "answer_audio": "a3.wav"}
#   {"turns": [{"question": "Hi", "answer": "Hello.", "answer_audio": "a4.wav"}, {...}], "voice": "me.wav"}
#
# and writes the rows --data reads (section 3): each answer's speech as Mimi codes (frame-major), the
# voice clip's first 300 frames and its CAM++ embedding (files.clone_voice, as chat.py's --voice FILE, run once per clip),
# each question's audio as 16 kHz mono WAV bytes (what SenseVoice hears), the image file's bytes, and
# the conversation, its first question carrying the <image> mark when there is an image. Paths are
# relative to the manifest; any format soundfile reads, any sample rate, mono or stereo.
#
# The lines go in chunks of --prepare_chunk, each written (atomically) as one part file in OUT.parts/,
# named by a hash of its lines and of the Mimi and CAM++ files. A run that is killed and started again
# reuses the parts it finds and makes only the others; once all are there they are joined into OUT
# and OUT.parts/ is removed. (Re-recorded clips under the same names are not noticed: delete OUT.parts/.)

PREPARE_CHUNK = 64     # manifest lines per part file: what a killed run keeps
MIMI_BATCH = 8         # answer clips per Mimi encode call, zero-padded to the longest
TURN_KEYS = ("question", "question_audio", "answer", "answer_audio")
LINE_KEYS = TURN_KEYS + ("turns", "voice", "image")
PREPARED = pa.schema([("conversations", pa.string()), ("question_audios", pa.list_(pa.binary())),
                      ("answer_audios", pa.list_(pa.list_(pa.int16()))), ("image_bytes", pa.list_(pa.binary())),
                      ("ref_audios", pa.list_(pa.int16())), ("spk_emb", pa.list_(pa.float32()))])
BAD_LINES_KEY = b"bad_lines"   # a part's metadata: the messages of the lines it left out (--skip_bad_rows)


class BadLine(ValueError):
    """A manifest line that cannot become a row; the message names the manifest and the line."""

    @classmethod
    def at(cls, manifest, line, problem):
        return cls(f"{manifest}, line {line}: {problem}")


@dataclass
class Exchange:
    """One manifest line with its files read and checked; its answers not yet encoded."""
    conversations: list     # [{role, content}], user and assistant turns in turn
    question_audios: list   # 16 kHz mono WAV bytes per user turn (b"" for a question asked in text only)
    answer_wavs: list       # (S,) 24 kHz float32 per assistant turn, or None (an answer in text only)
    image: Optional[bytes]  # the image file, as it is
    voice: Optional[dict]   # clone_voice's {'ref_codes': (8, R) int64, 'spk_emb': (192,) float32}


def load_part(key, path, load, device):
    """files.PARTS[key], loaded from path by load(path, device); a failure also names the option --key."""
    try:
        with files.loading(key, path):
            return load(path, device)
    except (FileNotFoundError, files.DamagedPartError) as e:
        raise type(e)(f"--{key}: {e}") from e


class Preparer:
    """Mimi and CAM++ (only when some line names a voice), loaded once, and the voices cloned so far
    (one clone per distinct clip)."""

    def __init__(self, args, needs_voices):
        self.folder = os.path.dirname(os.path.abspath(args.prepare[0]))   # manifest paths are relative to it
        self.mimi = load_part("mimi", args.mimi, files.load_mimi, args.device)
        self.campp = None
        if needs_voices:
            self.campp = load_part("campplus", args.campplus, files.load_speaker_encoder, args.device)
        self.voices = {}

    def path(self, line, key):
        value = line[key]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} should be a file path, not {value!r}")
        return os.path.join(self.folder, value)

    def audio(self, line, key, rate):
        """The clip at line[key] as (S,) float32 at `rate`; a missing or undecodable file names the key."""
        try:
            return files.load_audio(self.path(line, key), rate)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{key}: {e}") from None

    def voice(self, line):
        path = os.path.realpath(self.path(line, "voice"))
        if path not in self.voices:
            try:
                self.voices[path] = files.clone_voice(path, self.mimi, self.campp)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"voice: {e}") from None
        return self.voices[path]

    def image(self, line):
        path = self.path(line, "image")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image: {path} not found")
        files.open_image(path)  # undecodable: a ValueError naming the file
        with open(path, "rb") as f:
            return f.read()


def wav_file(wav, rate):
    """(S,) float32 -> the bytes of a 16-bit PCM WAV file."""
    buf = io.BytesIO()
    sf.write(buf, wav, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def read_turns(line):
    """A manifest line's exchanges: its `turns`, or the line itself as the one exchange."""
    if "turns" not in line:
        return [{k: line[k] for k in TURN_KEYS if k in line}]
    turns = line["turns"]
    if not (isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns)):
        raise ValueError("turns should be a non-empty list of {question, answer, ...} objects")
    if any(k in line for k in TURN_KEYS):
        raise ValueError(f"a line with turns keeps {', '.join(TURN_KEYS)} inside its turns")
    for i, turn in enumerate(turns, 1):
        unknown = sorted(set(turn) - set(TURN_KEYS))
        if unknown:
            raise ValueError(f"turn {i}: unknown key {unknown[0]!r} (a turn has {', '.join(TURN_KEYS)})")
    return turns


def read_turn(turn, prep, has_image):
    """One exchange -> (question text, its 16 kHz WAV bytes or b"", answer text, its (S,) 24 kHz speech or None)."""
    question, answer = turn.get("question", ""), turn.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("no answer: every exchange needs its answer text")
    if not isinstance(question, str) or not (question.strip() or "question_audio" in turn):
        raise ValueError("no question: give its text (question), its audio (question_audio) or both")
    if mo.IMAGE_MARK in question and not has_image:
        raise ValueError(f"the question has an {mo.IMAGE_MARK} mark but the line has no image")
    asked = wav_file(prep.audio(turn, "question_audio", SPEECH_RATE), SPEECH_RATE) if "question_audio" in turn else b""
    spoken = prep.audio(turn, "answer_audio", mo.SAMPLE_RATE_MIMI) if "answer_audio" in turn else None
    return question, asked, answer, spoken


def read_exchange(text, prep):
    """One manifest line -> Exchange; a problem raises ValueError (FileNotFoundError for a missing file)."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(line, dict):
        raise ValueError('expected a JSON object such as {"question": ..., "answer": ..., "answer_audio": ...}')
    unknown = sorted(set(line) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (a line has {', '.join(LINE_KEYS)})")
    image = prep.image(line) if "image" in line else None
    ex = Exchange([], [], [], image, None)
    for i, turn in enumerate(read_turns(line), 1):
        try:
            question, asked, answer, spoken = read_turn(turn, prep, image is not None)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"turn {i}: {e}" if "turns" in line else str(e)) from None
        ex.conversations += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ex.question_audios.append(asked)
        ex.answer_wavs.append(spoken)
    if image is not None and not any(mo.IMAGE_MARK in t["content"] for t in ex.conversations):
        ex.conversations[0]["content"] = f"{mo.IMAGE_MARK}\n{ex.conversations[0]['content']}"  # the image first
    ex.voice = prep.voice(line) if "voice" in line else None
    return ex


@torch.no_grad()
def encode_in_batches(mimi, wavs, batch_size=MIMI_BATCH):
    """(S_i,) 24 kHz clips -> their (8, ceil(S_i / 1920)) codes, what mo.encode_audio_codes gives one by
    one. Clips of similar length share an encode call, zero-padded to the longest: Mimi is causal, so
    the zeros after a clip cannot change its frames."""
    codes = [None] * len(wavs)
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))  # similar lengths together: less padding
    device = next(mimi.parameters()).device
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        clips = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(wavs[i]) for i in group], batch_first=True)
        frames = mimi.encode(clips[:, None].to(device)).long().cpu()                   # (B, 8, F_max)
        for i, f in zip(group, frames):
            codes[i] = f[:, :math.ceil(len(wavs[i]) / mo.MIMI_FRAME_SAMPLES)]
    return codes


def frame_major(codes):
    """(8, F) codes -> [F * 8] ints, frame by frame (the release's layout)."""
    return codes.T.reshape(-1).tolist()


def prepare_chunk(lines, prep, manifest, skip_bad):
    """[(line number, text)] -> a table of the good lines' rows in PREPARED's schema, the bad lines'
    messages in its metadata. A bad line raises its BadLine, unless skip_bad."""
    exchanges, bad = [], []
    for number, text in lines:
        try:
            exchanges.append(read_exchange(text, prep))
        except (FileNotFoundError, ValueError) as e:
            if not skip_bad:
                raise BadLine.at(manifest, number, str(e)) from None
            bad.append(str(BadLine.at(manifest, number, str(e))))
    codes = iter(encode_in_batches(prep.mimi, [w for ex in exchanges for w in ex.answer_wavs if w is not None]))
    columns = {name: [] for name in PREPARED.names}
    for ex in exchanges:
        columns["conversations"].append(json.dumps(ex.conversations, ensure_ascii=False))
        columns["question_audios"].append(ex.question_audios if any(ex.question_audios) else [])
        columns["answer_audios"].append([[] if w is None else frame_major(next(codes)) for w in ex.answer_wavs])
        columns["image_bytes"].append([] if ex.image is None else [ex.image])
        columns["ref_audios"].append([] if ex.voice is None else frame_major(ex.voice["ref_codes"]))
        columns["spk_emb"].append([] if ex.voice is None else ex.voice["spk_emb"].tolist())
    return pa.table(columns, schema=PREPARED).replace_schema_metadata({BAD_LINES_KEY: json.dumps(bad)})


def part_path(parts, k, chunk, args):
    """OUT.parts/part-<k>-<hash>.parquet; the hash covers the chunk's lines and the Mimi and CAM++ files."""
    digest = hashlib.sha1(repr((chunk, identity(args.mimi), identity(args.campplus))).encode()).hexdigest()
    return os.path.join(parts, f"part-{k:06d}-{digest[:ID_HASH_CHARS]}.parquet")


def names_a_voice(text):
    """Whether a manifest line (JSON text) has a voice key; a line that is not a JSON object has none."""
    try:
        return "voice" in json.loads(text) if text.lstrip().startswith("{") else False
    except json.JSONDecodeError:
        return False


def manifest_lines(manifest):
    """[(line number, text)] of the manifest's non-blank lines (numbered from 1, as editors do)."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"--prepare: manifest {manifest} not found")
    try:
        with open(manifest, encoding="utf-8") as f:
            lines = [(n, text) for n, text in enumerate(f, 1) if text.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--prepare: manifest {manifest} is not UTF-8 text ({e})") from None
    if not lines:
        raise ValueError(f"--prepare: manifest {manifest} has no lines (one JSON object per exchange)")
    return lines


def prepare(args):
    """--prepare MANIFEST OUT: write OUT, part by part (see above); returns a summary dict (also printed)."""
    manifest, out = args.prepare
    lines = manifest_lines(manifest)
    if args.prepare_chunk < 1:
        raise ValueError(f"--prepare_chunk must be at least 1, got {args.prepare_chunk}")
    prep = Preparer(args, needs_voices=any(names_a_voice(text) for _, text in lines))
    parts, started = f"{out}.parts", time.time()
    chunks = [lines[i:i + args.prepare_chunk] for i in range(0, len(lines), args.prepare_chunk)]
    paths = [part_path(parts, k, chunk, args) for k, chunk in enumerate(chunks)]
    reused = sum(os.path.exists(p) for p in paths)
    bar = tqdm(total=len(lines), unit="line", dynamic_ncols=True, desc="prepare")
    for chunk, path in zip(chunks, paths):
        if not os.path.exists(path):
            table = prepare_chunk(chunk, prep, manifest, args.skip_bad_rows)
            with files.atomic_path(path) as tmp:
                pq.write_table(table, tmp)
        bar.update(len(chunk))
    bar.close()
    tables = [pq.read_table(p) for p in paths]
    bad = sum((json.loads(t.schema.metadata[BAD_LINES_KEY]) for t in tables), [])
    with files.atomic_path(out) as tmp:
        pq.write_table(pa.concat_tables([t.replace_schema_metadata() for t in tables]) if tables
                       else PREPARED.empty_table(), tmp)
    shutil.rmtree(parts, ignore_errors=True)
    summary = dict(path=out, rows=sum(len(t) for t in tables), lines=len(lines), bad_lines=bad, parts=len(paths),
                   reused_parts=reused, seconds=time.time() - started)
    report_prepared(summary)
    return summary


def report_prepared(s):
    lines = [f"wrote {s['rows']} rows from {s['lines']} manifest lines to {s['path']} in {s['seconds']:.0f} s"
             + (f" ({s['reused_parts']} of {s['parts']} parts kept from an earlier run)" if s["reused_parts"] else "")]
    if s["bad_lines"]:
        lines += [f"skipped {len(s['bad_lines'])} bad lines:"] + [f"  {m}" for m in s["bad_lines"]]
    lines.append(f"next: python train.py --data {s['path']} --from_weight ...   (README.md, 'Your own data')")
    tqdm.write("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    check_device(args)
    return prepare(args) if args.prepare else train(args)


if __name__ == "__main__":
    try:  # one line, not a traceback, for missing files, bad data or arguments, a full disk, a step too big
        main()
    except (FileNotFoundError, SaveFailed, ValueError, OutOfMemory) as e:
        sys.exit(f"train.py: {e}")
