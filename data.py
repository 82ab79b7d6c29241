"""
The data side of MiniMind-O training: from parquet rows in the release's schema to padded batches, and from
your own recordings to such rows. train.py is the loop that uses it.

    1. frozen encoders       SenseVoice (speech) and SigLIP2 (images): never trained, run under no_grad;
                             --encoder_cache DIR stores their outputs once and reads them back afterwards
    2. parquet rows          one row -> Python values, checked; a bad row names its file, row and column
    3. question audio        decode, 16 kHz mono, the release's waveform/spectrogram augmentations
    4. one sample            draw the variations, cut the conversation, build the nine rows
    5. batches               a seeded shuffle per epoch (--group_by_length: rows of similar length together),
                             padded only to the longest sample in the batch
    6. demo data             a tiny arithmetic/colour T2A set in the official schema, made on the fly
    7. data preparation      --prepare: a manifest of your own recordings -> parquet rows in the release's schema
"""
import hashlib
import io
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field, is_dataclass, replace
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

import minimind_o as mo
import files

PUBLISHED_DATA = ("the release's data is `minimind-o_dataset` under `jingyaogong` on Hugging Face / `gongjy` on "
                  "ModelScope")


# -----------------------------------------------------------------------------------------------
# 1. The frozen encoders ("ears and eyes")
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
    ('<data file id>/<row>' for an image, '<data file id>/<row>-<user turn>' for a question).
    EncoderCache() is no cache: it finds nothing and keeps nothing. The dataset asks it for each
    sample's input (ask); the training step encodes what it did not have and fills it (outputs)."""

    def __init__(self, root=None, kind=None, encoder_folder=None):
        self.folder = None if root is None else os.path.join(root, f"{kind}-{identity(encoder_folder)}")

    def path(self, key):
        return os.path.join(self.folder, key + ".npy")

    def get(self, key):
        """The stored (L, D) float16 output, or None."""
        if self.folder is None:
            return None
        try:
            return torch.from_numpy(np.load(self.path(key)))
        except FileNotFoundError:
            return None

    def ask(self, key, make_input):
        """What a sample gives the encoder: (the stored output, None) when the cache has it, else
        (make_input(), key), the input to encode and the key to store its output under."""
        output = self.get(key)
        return (output, None) if output is not None else (make_input(), key)

    def outputs(self, work, encode, lengths=None):
        """(B, L, D) float32 outputs of a batch's EncoderWork: those read from the cache as they are, the
        others from one call encode(work.inputs); with a cache these are first rounded to its float16, so
        a step is the same whether they were just computed or read back (and resume stays exact), then
        stored (outputs[b, :lengths[b]]; all of outputs[b] without lengths)."""
        fresh = None if work.inputs is None else encode(work.inputs)
        if fresh is not None:
            fresh = (fresh.to(CACHE_DTYPE) if self.folder is not None else fresh).float()
        known = [x for x in (fresh, work.stored) if x is not None]
        width, dim = max(x.shape[1] for x in known), known[0].shape[-1]
        outputs = torch.zeros(len(work.encode), width, dim, device=work.encode.device)
        if work.stored is not None:
            outputs[:, :work.stored.shape[1]] = work.stored
        if fresh is not None:
            outputs[work.encode, :fresh.shape[1]] = fresh
        self.put(work.keys, outputs, lengths)
        return outputs

    def put(self, keys, outputs, lengths=None):
        """Store outputs[b, :lengths[b]] (all of outputs[b] without lengths) as float16 under keys[b],
        for each sample that has a key; the batch is copied to the CPU once."""
        if self.folder is None or all(key is None for key in keys):
            return
        outputs = outputs.to("cpu", CACHE_DTYPE)
        lengths = [None] * len(keys) if lengths is None else lengths.tolist()
        for key, output, n in zip(keys, outputs, lengths):
            if key is not None:
                with files.atomic_path(self.path(key)) as tmp:  # a reader finds a whole entry or none
                    np.save(tmp, output[:n].numpy())


@dataclass
class EncoderWork:
    """A batch's work for one frozen encoder: the inputs it has to encode, and the outputs that
    --encoder_cache holds for the other samples, with the keys to store the new outputs under."""
    inputs: Optional[torch.Tensor]  # (N, L, 560) zero-padded features or (N, 3, 256, 256) pixels; None: all stored
    encode: torch.Tensor            # (B,) bool: the N samples whose inputs are in `inputs`
    stored: Optional[torch.Tensor]  # (B, L', D) float16 zero-padded outputs read from the cache, or None
    keys: list                      # (B,) where to store each newly encoded output, else None

    @classmethod
    def gather(cls, given, keys, batch_inputs):
        """A batch's EncoderWork from what each sample gives the encoder (see EncoderCache.ask: an input
        to encode, with its key, or a stored output, or None); None when no sample gives anything.
        batch_inputs: the N inputs -> one tensor."""
        if all(x is None for x in given):
            return None
        encode = torch.tensor([key is not None for key in keys])
        inputs = [x for x, key in zip(given, keys) if key is not None]
        stored = [x if key is None else None for x, key in zip(given, keys)]
        padded = None
        if any(x is not None for x in stored):  # kept in float16: half the bytes to move to the device
            dim = next(x for x in stored if x is not None).shape[-1]
            padded = mo.pad_features(stored, dim, "cpu")[0].to(CACHE_DTYPE)
        return cls(batch_inputs(inputs) if inputs else None, encode, padded, keys)


@dataclass
class Encoders:
    """What the data workers need (CPU-side) and what the training step runs on the device."""
    speech: Optional[torch.nn.Module] = None   # SenseVoice encoder, on the device
    speech_frontend: Optional[torch.nn.Module] = None  # funasr's front end (CPU), for mo.speech_features
    vision: Optional[torch.nn.Module] = None   # SigLIP2 vision tower, on the device
    image_processor: Optional[object] = None   # SigLIP2 preprocessing (resize 256, normalise)
    speech_cache: EncoderCache = field(default_factory=EncoderCache)  # --encoder_cache, with --augment none
    image_cache: EncoderCache = field(default_factory=EncoderCache)   # --encoder_cache


def load_encoders(rows, args, device):
    """Load only the encoders the data needs: T2A data needs neither."""
    enc = Encoders()
    if rows.has_any("question_audios"):
        with files.loading("sensevoice", args.speech_encoder, "--speech_encoder"):
            enc.speech = files.load_speech_encoder(args.speech_encoder, device)
        enc.speech_frontend = enc.speech.frontend
    if rows.has_any("image_bytes"):
        with files.loading("siglip", args.vision_encoder, "--vision_encoder"):
            enc.vision, enc.image_processor = files.load_vision_encoder(args.vision_encoder, device)
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
    if enc.speech is not None and args.augment != "none":
        line += (f"; question audio is not cached: --augment {args.augment} changes it every epoch "
                 "(--augment none would cache it)")
    elif enc.speech is None and enc.vision is None:
        line += " (no row has question audio or an image)"
    return line


def encode_inputs(batch, encoders):
    """Frozen encoders on the device: questions -> (B, L, 512), images -> (B, 64, 768); None where the
    batch has none."""
    audio = image = None
    with torch.no_grad():
        if batch.speech is not None:
            lengths = batch.speech_lengths
            audio = encoders.speech_cache.outputs(
                batch.speech, lambda x: run_speech_encoder(encoders.speech, x, lengths[batch.speech.encode]), lengths)
        if batch.image is not None:
            image = encoders.image_cache.outputs(batch.image, lambda x: run_vision_encoder(encoders.vision, x))
    return audio, image


# -----------------------------------------------------------------------------------------------
# 2. Parquet rows in the release's schema
# -----------------------------------------------------------------------------------------------

class BadRow(ValueError):
    """A row that cannot become a sample; the message says where it is and what is wrong."""

    def __init__(self, message):
        # raised in a DataLoader worker, it is raised again in the training process as BadRow("Caught
        # BadRow in DataLoader worker ... <traceback> ... data.BadRow: <message>"): keep only <message>
        super().__init__(message.rpartition("BadRow: ")[2].rstrip("\n"))

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
            except (pa.ArrowException, OSError) as e:  # pyarrow's OSError: damaged bytes (e.g. "Corrupt snappy")
                raise ValueError(f"{path} is not a readable parquet file ({e}): is it damaged, or cut short?") from None
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
        conversations = checked_conversations(cell("conversations"), file, r)
        ref, spk = numbers(cell("ref_audios")), numbers(cell("spk_emb"))  # empty: the row has none
        if len(spk) not in (0, mo.OmniConfig.spk_emb_size):
            raise BadRow.at(file, r, "spk_emb", f"{len(spk)} values, expected {mo.OmniConfig.spk_emb_size}")
        if not np.isfinite(spk).all():  # a NaN voice would turn every weight it reaches into NaN
            raise BadRow.at(file, r, "spk_emb", "holds values that are not numbers (NaN or infinite)")
        image = cell("image_bytes")  # bytes, or a list of bytes of which the first is used
        if isinstance(image, pa.ListScalar):
            image = next(iter(items(image)), None)
        codes = lambda values, column: checked_codes(values, file, r, column)
        return Row(file, r, self.sources[f], conversations,
                   question_audios=[a.as_py() for a in items(cell("question_audios"))],
                   answer_audios=[codes(numbers(turn), "answer_audios") for turn in items(cell("answer_audios"))],
                   image=None if image is None else image.as_py(),
                   ref_codes=codes(ref, "ref_audios") if len(ref) else None,
                   spk_emb=spk.astype(np.float32) if len(spk) else None)


def checked_conversations(cell, file, r):
    """Row r's conversations cell (JSON text) -> its [{role, content}] turns, or BadRow."""
    try:
        conversations = json.loads(cell.as_py())
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
    return conversations


def checked_codes(values, file, r, column):
    """Row r's flattened codes (frame-major, N_CODEBOOKS a frame) as they are, or BadRow."""
    if len(values) % mo.N_CODEBOOKS:
        raise BadRow.at(file, r, column, f"{len(values)} codes, not a multiple of {mo.N_CODEBOOKS} "
                                      f"(frame-major, {mo.N_CODEBOOKS} codes a frame)")
    if len(values) and not 0 <= values.min() <= values.max() < mo.CODEBOOK_SIZE:
        raise BadRow.at(file, r, column, f"codes must be in 0..{mo.CODEBOOK_SIZE - 1}, "
                                      f"found {values.min()}..{values.max()}")
    return values


# -----------------------------------------------------------------------------------------------
# 3. Question audio: decode, augment, features
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
# 4. One training sample
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
    speech: Optional[torch.Tensor]        # the question: (L, 560) features to encode, or its stored (L, 512) output
    image: Optional[torch.Tensor]         # (3, 256, 256) SigLIP2 input to encode, or the stored (64, 768) output
    spk_emb: Optional[torch.Tensor]       # (192,) or None
    speech_key: Optional[str] = None      # set where speech is to be encoded: the key to store its output under
    image_key: Optional[str] = None       # the same for the image (see EncoderCache.ask)
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
        """The Sample of row `index`. A bad row raises its BadRow here, in the data worker, which stops
        the run; with skip_bad_rows it is replaced by the next good one and its problem travels with that
        sample to be logged, so every batch keeps its size (and every process the same number of steps)."""
        problems = []
        for i in (k % len(self) for k in range(index, index + len(self))):
            try:
                sample = self.make_sample(self.rows.read(i), sample_rng(self.seed, self.epoch, i))
            except BadRow as e:
                if not self.skip_bad_rows:
                    raise
                problems.append(str(e))
            else:
                sample.skipped = problems
                return sample
        raise ValueError(f"every row of the data is bad, e.g. {problems[0]}")

    def make_sample(self, row, rng):
        """Row -> Sample, every random choice drawn from rng (variations, cut, augmentation, noise)."""
        conversations = row.conversations
        variations = draw_variations(rng, has_system_turn=conversations[0]["role"] == "system")
        replies = sum(t["role"] == "assistant" for t in conversations)
        if replies > 1:  # multi-turn: learn one randomly chosen reply, with everything before it as context
            conversations = cut_conversation(conversations, rng.randrange(replies), self.tok, self.max_len)
        replies = sum(t["role"] == "assistant" for t in conversations)
        teaches_nothing(row, replies)
        speech, speech_key, image, image_key = self.encoder_inputs(row, conversations, rng)
        answer = row.answer_audios[replies - 1] if 0 < replies <= len(row.answer_audios) else None

        input_ids, text_labels, audio_labels = mo.build_sample(
            conversations, self.tok, self.max_len, answer_codes=answer, ref_codes=row.ref_codes,
            has_spk=row.spk_emb is not None, n_audio_tokens=0 if speech is None else len(speech),
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
        return Sample(input_ids, text_labels, audio_labels, length, speech, image, spk, speech_key, image_key)

    def encoder_inputs(self, row, conversations, rng):
        """What the question audio (of the last kept user turn) and the image give their encoders:
        (speech, its key, image, its key), each input read from --encoder_cache or made (see
        EncoderCache.ask); None, None for what the sample does not have."""
        speech = speech_key = image = image_key = None
        turn = sum(t["role"] == "user" for t in conversations) - 1
        if 0 <= turn < len(row.question_audios) and row.question_audios[turn]:
            speech, speech_key = self.encoders.speech_cache.ask(
                f"{row.source}/{row.row}-{turn}", lambda: self.question_features(row, row.question_audios[turn], rng))
        if row.image:
            image, image_key = self.encoders.image_cache.ask(f"{row.source}/{row.row}", lambda: self.image_pixels(row))
        return speech, speech_key, image, image_key

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
# 5. Batches: a seeded order per epoch, padded to the longest sample in the batch
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


def pad_speech(feats):
    """(L_i, 560) features -> (N, L, 560) zero-padded."""
    return mo.pad_features(feats, mo.SPEECH_FEAT_DIM, "cpu")[0]


def collate(samples, width_multiple=1):
    """Samples -> Batch. Each sample was built at max_len; the batch keeps only the first T positions,
    T = the longest valid length in the batch (not max_len: most samples are much shorter), rounded up
    to a multiple of width_multiple (at most the samples' length): --compile then sees a few widths.
    Positions after a sample's valid length have no labels and, attention being causal, change nothing
    before them (only a MoE's load-balance loss, averaged over every position, sees them)."""
    longest = max(s.length for s in samples)
    T = min(math.ceil(longest / width_multiple) * width_multiple, samples[0].input_ids.shape[-1])
    stack = lambda name: torch.stack([getattr(s, name)[..., :T] for s in samples])
    speech = EncoderWork.gather([s.speech for s in samples], [s.speech_key for s in samples], pad_speech)
    spk = None
    if any(s.spk_emb is not None for s in samples):
        spk = torch.stack([s.spk_emb if s.spk_emb is not None else torch.zeros(mo.OmniConfig.spk_emb_size)
                           for s in samples])
    # a question's length is the same as features or as stored outputs (one encoder frame each)
    lengths = None if speech is None else torch.tensor([0 if s.speech is None else len(s.speech) for s in samples])
    return Batch(stack("input_ids"), stack("text_labels"), stack("audio_labels"), speech=speech,
                 speech_lengths=lengths,
                 image=EncoderWork.gather([s.image for s in samples], [s.image_key for s in samples], torch.stack),
                 spk_emb=spk, tokens=sum(s.length for s in samples), bad_rows=sum((s.skipped for s in samples), []))


# -----------------------------------------------------------------------------------------------
# 6. Demo data: a small T2A set in the official schema, made on the fly
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
# 7. Data preparation: your own recordings -> parquet rows in the release's schema
# -----------------------------------------------------------------------------------------------
# python train.py --prepare MANIFEST OUT.parquet reads a JSON-lines manifest, one exchange a line:
#
#   {"question": "What is two plus three?", "answer": "Five.", "answer_audio": "a1.wav", "voice": "me.wav"}
#   {"question_audio": "q2.wav", "question": "Hi!", "answer": "Hello.", "answer_audio": "a2.wav"}
#   {"question": "What is this?", "image": "cat.png", "answer": "A cat.", "answer_audio": "a3.wav"}
#   {"turns": [{"question": "Hi", "answer": "Hello.", "answer_audio": "a4.wav"}, {...}], "voice": "me.wav"}
#
# and writes the rows --data reads (section 2): each answer's speech as Mimi codes (frame-major), the
# voice clip's first 300 frames and its CAM++ embedding (files.clone_voice, as chat.py's --voice FILE, run once per clip),
# each question's audio as 16 kHz mono WAV bytes (what SenseVoice hears), the image file's bytes, and
# the conversation, its first question bearing the <image> mark when there is an image. Paths are
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


class Preparer:
    """Mimi and CAM++ (only when some line names a voice), loaded once, and the voices cloned so far
    (one clone per distinct clip)."""

    def __init__(self, args, needs_voices):
        self.folder = os.path.dirname(os.path.abspath(args.prepare[0]))   # manifest paths are relative to it
        with files.loading("mimi", args.mimi, "--mimi"):
            self.mimi = files.load_mimi(args.mimi, args.device)
        self.campp = None
        if needs_voices:
            with files.loading("campplus", args.campplus, "--campplus"):
                self.campp = files.load_speaker_encoder(args.campplus, args.device)
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
