"""
MiniMind-O's files: everything it reads from or writes to disk, each failure a message that names the
file and says what to do. minimind_o.py (the model) never touches the disk, apart from the tokenizer;
this file turns files into what it takes: state dicts, loaded side modules, arrays and images.

  1. the published parts, one table (`PARTS`); what is missing, --download, and `loading`'s messages
  2. checkpoints: one atomic writer for every file the project writes; the readers of every published form
  3. the frozen side modules' loaders: SenseVoice-Small, SigLIP2, Mimi, CAM++ from their published files
  4. the user's voices: cloned from a clip (checked first), kept in the release's voices.pt format
  5. the user's files: audio and images, decoded with an error that names the file; the flags' numbers
"""
import argparse
import contextlib
import io
import pickle
import json
import math
import os
import re
import uuid
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

import minimind_o as mo

# -----------------------------------------------------------------------------------------------
# 1. The published parts: what each is, where it goes, how to get it
# -----------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"                 # where the entry points look for every part by default
MIMI_WEIGHTS = "tokenizer-e351c8d8-checkpoint125.safetensors"  # what moshi.models.loaders fetches
CAMPP_WEIGHTS = "campplus_cn_common.bin"
SENSEVOICE_FILES = ("config.yaml", "model.pt", "am.mvn")
SIGLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
RELEASE_FOLDERS = ("minimind-3o", "minimind-3o-moe")   # Transformers-format folders (weights + tokenizer)
RELEASE_FILES = ("sft_omni_768.pth", "sft_omni_768_moe.pth", "llm_768.pth")  # in `minimind-3o-pytorch`
RELEASE_URL = "https://raw.githubusercontent.com/jingyaogong/minimind-o/master/model/"  # the release's GitHub files
DOWNLOAD_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 5      # a server that does not answer this soon is taken for being offline


@dataclass
class Part:
    name: str                  # what it is, for people
    needed_for: str            # what of the chat needs it
    place: str                 # where the entry points look for it by default, in the project's folder
    download: tuple            # commands for people, each putting it at `place` (the release's first)
    hub: Optional[str] = None  # the Hugging Face repository --download fetches it from
    files: tuple = ()          # for a folder: the files that must be in it, all that --download fetches
    url: Optional[str] = None  # or the one file's address, fetched instead of a repository

    @property
    def default(self):
        return str(ROOT / self.place)

    @property
    def how(self):
        """The download commands, for a message: `one` or `another`."""
        return " or ".join(f"`{command}`" for command in self.download)

    def present(self, path):
        """The file itself, or a folder with the part's files (the checkpoint's: with weights in it)."""
        if self.files and not os.path.isfile(path):
            return all((Path(path) / f).is_file() for f in self.files)
        return weights_file(path) is not None


HF, MS = "hf download", "modelscope download --model"  # the Hugging Face CLI; ModelScope's, as the release writes it
PARTS = {  # key: the option that points at the part (--checkpoint ...), as chat.py and evaluate.py name it
    # no hub: --download takes the release folder or .pth that the path names (see fetch)
    "checkpoint": Part("MiniMind-O weights", "everything", "models/minimind-3o",
                       (f"{MS} gongjy/minimind-3o-pytorch sft_omni_768.pth --local_dir models",
                        f"{HF} jingyaogong/minimind-3o --local-dir models/minimind-3o")),
    "tokenizer": Part("tokenizer", "everything", "models/minimind-3o",
                      (f'{HF} jingyaogong/minimind-3o --include "tokenizer*" --local-dir models/minimind-3o',
                       f"curl -L --create-dirs -o models/minimind-3o/tokenizer.json {RELEASE_URL}tokenizer.json"),
                      "jingyaogong/minimind-3o", ("tokenizer.json",)),
    # moshi's file, which load_mimi reads; the release's `gongjy/mimi` is the Transformers layout, which it does not
    "mimi": Part("Mimi codec", "speech out and voice cloning", "models/mimi",
                 (f"{HF} kyutai/moshiko-pytorch-bf16 {MIMI_WEIGHTS} --local-dir models/mimi",),
                 "kyutai/moshiko-pytorch-bf16", (MIMI_WEIGHTS,)),
    "sensevoice": Part("speech encoder (SenseVoice-Small)", "speech in (/audio, --audio, --mic)", "models/SenseVoiceSmall",
                       (f"{MS} gongjy/SenseVoiceSmall --local_dir models/SenseVoiceSmall",
                        f"{HF} FunAudioLLM/SenseVoiceSmall --local-dir models/SenseVoiceSmall"),
                       "FunAudioLLM/SenseVoiceSmall", SENSEVOICE_FILES),
    # the release's vision tower alone, or google's whole SigLIP2 (its text tower is skipped when loading)
    "siglip": Part("vision encoder (SigLIP2)", "images (/image, --image)", "models/siglip2-base-p32-256-ve",
                   (f"{MS} gongjy/siglip2-base-p32-256-ve --local_dir models/siglip2-base-p32-256-ve",
                    f"{HF} jingyaogong/siglip2-base-p32-256-ve --local-dir models/siglip2-base-p32-256-ve",
                    f"{HF} google/siglip2-base-patch32-256 --local-dir models/siglip2-base-p32-256-ve"),
                   "jingyaogong/siglip2-base-p32-256-ve", SIGLIP_FILES),
    # the .bin of the official copies; the release's `gongjy/campplus` holds a .pt of another name
    "campplus": Part("speaker encoder (CAM++)", "voice cloning from an audio file", "models/campplus",
                     (f"{MS} iic/speech_campplus_sv_zh-cn_16k-common {CAMPP_WEIGHTS} --local_dir models/campplus",
                      f"{HF} funasr/campplus {CAMPP_WEIGHTS} --local-dir models/campplus"),
                     "funasr/campplus", (CAMPP_WEIGHTS,)),
    "voices": Part("voices", "/voice NAME", "models/voices.pt",
                   (f"curl -L -o models/voices.pt {RELEASE_URL}speaker/voices.pt",), url=f"{RELEASE_URL}speaker/voices.pt"),
}


class UserError(Exception):
    """A mistake of the user's, not a bug: a bad flag, a missing or damaged file, a bad row. The entry points
    print it as one line; any other exception keeps its traceback."""


class DamagedPartError(UserError, ValueError):
    """A published part is there but cannot be read (a git-lfs pointer, a cut download, another file)."""


def missing_report(args, keys, parts=PARTS):
    """One message listing every part in `keys` that is not where args say (args.KEY), or None when all are
    there. parts: key -> Part (benchmarks/evaluate.py passes its own, which add the ASR's files)."""
    lines = ["missing parts (put each where shown, point elsewhere with its option, or run with --download):"]
    for key in [k for k in keys if not parts[k].present(getattr(args, k))]:
        p = parts[key]
        lines.append(f"  {p.name} (for {p.needed_for}): {getattr(args, key)}  [--{key}]\n      get it with {p.how}")
        if key == "mimi":
            lines.append("      or chat in text only, without it: add --no_speech")
    return "\n".join(lines) if len(lines) > 1 else None


def fetch(part, path):
    """--download's way to `path`: the part's url, else its files from its Hugging Face repository (the
    checkpoint's by the name `path` ends in: a release folder whole, or one .pth)."""
    path = Path(path)
    if part.url:
        import urllib.request
        with urllib.request.urlopen(part.url, timeout=DOWNLOAD_TIMEOUT_S) as r, atomic_path(path) as tmp:
            Path(tmp).write_bytes(r.read())
        return
    repo, names = part.hub, part.files
    if repo is None and path.name in RELEASE_FOLDERS:
        repo = f"jingyaogong/{path.name}"
    elif repo is None and path.name in RELEASE_FILES:
        repo, names = "jingyaogong/minimind-3o-pytorch", (path.name,)
    elif repo is None:
        raise FileNotFoundError(f"{path} is not a published name ({', '.join(RELEASE_FOLDERS + RELEASE_FILES)}), "
                                "so --download cannot fetch it")
    from huggingface_hub import snapshot_download
    into = path.parent if path.name in names else path  # a path naming the one file, or the folder for them
    snapshot_download(repo, local_dir=into, allow_patterns=list(names) or None)


def reachable(url):
    """Whether the server of `url` takes a connection within CONNECT_TIMEOUT_S: offline, each part's
    download would otherwise retry for many seconds before failing."""
    import socket
    import urllib.parse
    address = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((address.hostname, address.port or 443), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def download(args, keys, parts=PARTS):
    """Fetch the parts in `keys` that are not where args say; returns the failures, a line each (none when
    all went well). Each server is asked once whether it answers: offline, nothing waits on retries."""
    from huggingface_hub import constants
    failures, online = [], {}
    for key in [k for k in keys if not parts[k].present(getattr(args, k))]:
        part, path = parts[key], Path(getattr(args, key))
        site = part.url or constants.ENDPOINT
        if site not in online:  # HF_HUB_OFFLINE=1 says so for the hub without asking
            online[site] = not (site == constants.ENDPOINT and constants.HF_HUB_OFFLINE) and reachable(site)
        error = f"{site} cannot be reached"
        if online[site]:
            print(f"downloading {part.name} into {path} ...", flush=True)
            try:
                fetch(part, path)
                continue
            except Exception as e:  # offline, unknown repo, refused: all end in the same advice
                error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        failures.append(f"{part.name}: {error} (are you online? or get it by hand: {part.how})")
    return failures


@contextlib.contextmanager
def loading(part, path, option=None):
    """Around the loading of PARTS[part] from `path`: a failure becomes one message naming the option that
    points there (when given), the file and how to get it (a missing file stays a FileNotFoundError)."""
    p, flag = PARTS[part], f"{option}: " if option else ""
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}{p.name}: {e}. Get it with {p.how}") from e
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedPartError(f"{flag}cannot read the {p.name} at {path} ({type(e).__name__}: {detail}). Is it the "
                               "published file, whole? A git-lfs pointer (a clone without git-lfs) or a cut "
                               f"download fails like this. Get it with {p.how}") from e


# -----------------------------------------------------------------------------------------------
# 2. Checkpoints: written atomically, read in every published form
# -----------------------------------------------------------------------------------------------
# The layout itself (key names, dtype) is minimind_o.py's section 9. Checkpoints are float16 .pth
# files (`sft_omni_768.pth`, `sft_omni_768_moe.pth`, the text-only start `llm_768.pth`) or
# Transformers-format folders (config.json + weights, the tied lm_head.weight may be absent).

@contextlib.contextmanager
def atomic_path(path):
    """Write to the yielded temporary path; it replaces `path` in one rename only when the block succeeds.
    A crash, a kill or a full disk leaves the previous file whole. The temporary name is unique (two
    writers never share it) and keeps the extension, for writers that go by it (soundfile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")  # the writer creates it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(model, path):
    """Save in the release's layout (float16 .pth), atomically: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(mo.official_state_dict(model), tmp)


def weights_file(path):
    """The file holding a checkpoint's weights: `path` itself, or in a release folder the first of
    model.safetensors, pytorch_model.bin, *.pth; None when there is none."""
    if os.path.isfile(path):
        return os.fspath(path)  # a str, as given
    folder = Path(path)
    candidates = [folder / "model.safetensors", folder / "pytorch_model.bin", *sorted(folder.glob("*.pth"))]
    return next((str(c) for c in candidates if c.is_file()), None)


def read_checkpoint(path):
    """A state dict from a .pth/.bin/.safetensors file, or from a release folder."""
    found = weights_file(path)
    if found is None:
        raise FileNotFoundError(f"no weights at {path} (a file, or a folder with model.safetensors, "
                                "pytorch_model.bin or *.pth)")
    if found.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(found)
    else:
        state = torch.load(found, map_location="cpu", weights_only=True)
        state = state["model"] if isinstance(state.get("model"), dict) else state  # train.py's resume files nest it
    # The release's files have no checksum; bytes damaged on disk almost always make some float16 value
    # NaN or infinite, which no trained weight is.
    damaged = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if damaged:
        raise ValueError(f"{found}: {len(damaged)} tensors hold values that are not numbers (NaN or infinite), "
                         f"{damaged[0]} first: the file is damaged; download or train it again")
    return state


def checkpoint_config(path, state_dict):
    """A checkpoint's shape: its folder's config.json (the release's; our fields kept), else read off the
    weights themselves, so any checkpoint file loads without a config."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        release = json.loads(config_file.read_text())
        ours = {field.name for field in fields(mo.OmniConfig)}   # the rest are transformers' extras
        return mo.OmniConfig(**{k: v for k, v in release.items() if k in ours})
    layers = lambda prefix: len({k.split(".")[2] for k in state_dict if k.startswith(prefix)})
    embed = state_dict["model.embed_tokens.weight"]
    cfg = dict(vocab_size=embed.shape[0], hidden_size=embed.shape[1], num_hidden_layers=layers("model.layers."),
               use_moe=any(".mlp.experts." in k for k in state_dict))
    if "talker.norm.weight" in state_dict:
        cfg.update(talker_hidden_size=state_dict["talker.norm.weight"].shape[0],
                   num_talker_hidden_layers=layers("talker.layers."))
    else:  # a text-only start (train.py): a Talker as wide as the Thinker, so it can start from its last blocks
        cfg.update(talker_hidden_size=embed.shape[1])
    return mo.OmniConfig(**cfg)


def load_model(path, device="cpu", dtype=torch.float32, config=None):
    """A ready mo.MiniMindO from a release checkpoint (file or folder) or a train.py checkpoint. The shape
    comes from `config`, else the folder's config.json, else the weights themselves."""
    state = read_checkpoint(path)
    if not any(k.startswith("talker.") for k in state):
        raise ValueError(f"{path} holds no talker.* weights, so no MiniMind-O to run (a text-only MiniMind, "
                         "llm_768.pth, is where training starts: train.py --from_weight)")
    model = mo.MiniMindO(config or checkpoint_config(path, state))
    model.load_official_state_dict(state)
    return model.to(device, dtype).eval()


# -----------------------------------------------------------------------------------------------
# 3. The frozen side modules, from their published files
# -----------------------------------------------------------------------------------------------
# The libraries are imported inside the loaders: importing this file costs only torch and numpy.
# A loader raises what its library raises; wrap it in `loading` for the message.

def need_files(folder, names):
    folder = Path(folder)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]} not found")
    return folder


def quiet_stdout():  # funasr prints an ffmpeg notice when first imported; chat.py's terminal is not its to write on
    return contextlib.redirect_stdout(io.StringIO())


def load_speech_encoder(folder, device="cpu"):
    """Published SenseVoiceSmall folder (config.yaml, model.pt, am.mvn) -> frozen SenseVoice-Small, as
    .frontend (funasr's fbank, LFR 7/6 and the model's CMVN) and .encoder."""
    import yaml
    with quiet_stdout():
        from funasr.frontends.wav_frontend import WavFrontend
        from funasr.models.sense_voice.model import SenseVoiceEncoderSmall
    folder = need_files(folder, SENSEVOICE_FILES)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    frontend = WavFrontend(cmvn_file=str(folder / "am.mvn"), **dict(config["frontend_conf"], dither=0.0))
    if frontend.cmvn.shape != (2, frontend.output_size()):
        raise ValueError(f"{folder / 'am.mvn'}: expected a shift and a scale of {frontend.output_size()} values")
    encoder = SenseVoiceEncoderSmall(input_size=frontend.output_size(), **config["encoder_conf"])
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)   # model.pt holds the whole ASR model; we keep its encoder
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    if encoder.output_size() != mo.SPEECH_EMBED_DIM:
        raise ValueError(f"{folder / 'model.pt'}: encoder width {encoder.output_size()}, expected {mo.SPEECH_EMBED_DIM}")
    return nn.ModuleDict(dict(frontend=frontend, encoder=encoder)).eval().requires_grad_(False).to(device)


def load_vision_encoder(folder, device="cpu"):
    """Published SigLIP2 folder (full model or vision-only) -> (frozen SiglipVisionModel, its image processor)."""
    from transformers import SiglipImageProcessor, SiglipVisionModel
    folder = need_files(folder, SIGLIP_FILES)
    model = SiglipVisionModel.from_pretrained(folder, dtype=torch.float32)   # a text tower's weights are skipped
    return model.eval().requires_grad_(False).to(device), SiglipImageProcessor.from_pretrained(folder)


def load_mimi(path, device="cpu"):
    """Mimi from the published safetensors file (or a folder holding it), using its first 8 codebooks."""
    from moshi.models import loaders as moshi_loaders
    path = Path(path) / MIMI_WEIGHTS if Path(path).is_dir() else Path(path)
    need_files(path.parent, (path.name,))
    mimi = moshi_loaders.get_mimi(str(path), device=device)
    mimi.set_num_codebooks(mo.N_CODEBOOKS)
    return mimi.eval().requires_grad_(False)


def load_speaker_encoder(folder, device="cpu"):
    """Published CAM++ folder (campplus_cn_common.bin) -> frozen funasr CAMPPlus (80 mels -> 192)."""
    with quiet_stdout():
        from funasr.models.campplus.model import CAMPPlus
    folder = need_files(folder, (CAMPP_WEIGHTS,))
    model = CAMPPlus(feat_dim=mo.SPK_MEL["n_mels"], embedding_size=mo.SPK_EMBED_DIM)
    model.load_state_dict(torch.load(folder / CAMPP_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------------------------
# 4. The user's voices: cloned from a clip, kept in the release's voices.pt format
# -----------------------------------------------------------------------------------------------

MAX_REF_FRAMES = 300                # 24 s of reference codes at most
MIN_CLONE_SECONDS = 1.0             # shorter clips hold too little of a voice
MIN_CLONE_RMS_DBFS = -45.0          # quieter than this the codec mostly encodes noise floor
CLIP_LEVEL = 0.999                  # a sample at or above this magnitude sits on the rail
MAX_CLIPPED_FRACTION = 1e-3         # more than 0.1% of samples on the rail = audibly clipped
VOICE_NAME = re.compile(r"[\w-]+")  # what `--voice NAME` and `/voice NAME` can choose: not a path, not two words


def _check_voice(name, voice, where):
    codes, emb = voice.get("ref_codes"), voice.get("spk_emb")
    if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.long and codes.dim() == 2
            and codes.size(0) == mo.N_CODEBOOKS and isinstance(emb, torch.Tensor) and emb.shape == (mo.SPK_EMBED_DIM,)):
        raise ValueError(f"voice {name!r} in {where}: expected ref_codes ({mo.N_CODEBOOKS}, R) int64 and "
                         f"spk_emb ({mo.SPK_EMBED_DIM},)")
    if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < mo.CODEBOOK_SIZE):
        raise ValueError(f"voice {name!r} in {where}: ref_codes outside the codebook (0..{mo.CODEBOOK_SIZE - 1})")
    if not torch.isfinite(emb).all():
        raise ValueError(f"voice {name!r} in {where}: spk_emb holds values that are not numbers (NaN or infinite)")


def check_voice_name(name):
    """Raise ValueError for a name that could never be chosen again: empty, 'none' (no voice), or one
    that would read as a file or as two words."""
    if not VOICE_NAME.fullmatch(name) or name.lower() == "none":
        raise ValueError(f"voice name {name!r}: use letters, digits, '_' and '-' ('none' means no voice)")


def load_voices(path):
    """voices.pt -> dict name -> {'ref_codes': (8, R) int64, 'spk_emb': (192,) float32}."""
    try:
        voices = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut short, overwritten, not torch.save's
        raise ValueError(f"cannot read the voices file {path} ({(str(e).splitlines() or [''])[0][:120]}): is it "
                         "damaged? Restore it or delete it (its voices are lost)") from e
    for name, voice in voices.items():
        _check_voice(name, voice, path)
    return voices


def check_clone_clip(wav, sr, name):
    """Raise ValueError when a reference clip is too short, too quiet or clipped to make a usable voice."""
    seconds = wav.size / sr
    if seconds < MIN_CLONE_SECONDS:
        raise ValueError(f"voice clip {name} is {seconds:.2f} s long; at least {MIN_CLONE_SECONDS} s is needed")
    rms_dbfs = 20 * math.log10(float(np.sqrt(np.mean(wav ** 2))))
    if rms_dbfs < MIN_CLONE_RMS_DBFS:
        raise ValueError(f"voice clip {name} is too quiet ({rms_dbfs:.1f} dBFS RMS, "
                         f"need at least {MIN_CLONE_RMS_DBFS} dBFS)")
    clipped = float(np.mean(np.abs(wav) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_FRACTION:
        raise ValueError(f"voice clip {name} is clipped ({clipped:.2%} of samples at full scale); "
                         "record it again at a lower level")


def clone_voice(wav_path, mimi, campp):
    """A speech clip -> voice dict: its first <= 300 Mimi frames as ref_codes and its CAM++ embedding."""
    wav, sr = read_audio(wav_path)
    check_clone_clip(wav, sr, wav_path)     # judged at the file's own rate, before resampling smooths clipping
    wav24 = mo.resample(wav, sr, mo.SAMPLE_RATE_MIMI)[:MAX_REF_FRAMES * mo.MIMI_FRAME_SAMPLES]
    voice = {"ref_codes": mo.encode_audio_codes(mimi, wav24).cpu(),                            # (8, <= 300)
             "spk_emb": mo.speaker_embedding(campp, mo.resample(wav24, mo.SAMPLE_RATE_MIMI, mo.SAMPLE_RATE_SPEECH))}
    _check_voice(Path(wav_path).stem, voice, wav_path)
    return voice


def save_voice(voices_path, name, voice):
    """Add (or replace) one voice in a voices.pt file, creating the file if needed."""
    check_voice_name(name)
    _check_voice(name, voice, "save_voice")
    voices_path = Path(voices_path)
    voices = load_voices(voices_path) if voices_path.exists() else {}
    voices[name] = {"ref_codes": voice["ref_codes"].long().cpu(), "spk_emb": voice["spk_emb"].float().cpu()}
    with atomic_path(voices_path) as tmp:  # a failure midway leaves every stored voice as it was
        torch.save(voices, tmp)


# -----------------------------------------------------------------------------------------------
# 5. The user's audio and image files, and numbers on the command line
# -----------------------------------------------------------------------------------------------

SILENCE_PEAK = 1e-4                 # a file whose loudest sample is below -80 dBFS holds no speech
SHORTEST_CLIP_S = 0.025             # one 25 ms analysis window of the speech front end
GREY16_PER_GREY8 = 257              # 65535 / 255: a 16-bit grey level per 8-bit one


def read_audio(source):
    """An audio file (path or bytes) -> (mono float32 numpy (S,), its sample rate)."""
    import soundfile as sf
    name = source if isinstance(source, (str, Path)) else f"<{len(source)} bytes of audio>"
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"audio file {name} not found")
    try:
        data, sr = sf.read(source if isinstance(source, (str, Path)) else io.BytesIO(source), dtype="float32",
                           always_2d=True)                                     # (S, channels)
    except Exception as e:      # libsndfile reports undecodable data in several exception types
        raise ValueError(f"cannot decode audio {name}: {e}") from e
    wav = data.mean(axis=1)     # stereo -> mono by averaging, which keeps both speakers of a 2-channel call
    if not np.isfinite(wav).all():  # a float file can hold NaN: it would pass every level check below
        raise ValueError(f"audio {name} holds samples that are not numbers (NaN or infinite)")
    if wav.size < sr * SHORTEST_CLIP_S:
        raise ValueError(f"audio {name} lasts {wav.size * 1000 / sr:.1f} ms, less than one "
                         f"{SHORTEST_CLIP_S * 1000:.0f} ms analysis window: too short to hear")
    if np.abs(wav).max() < SILENCE_PEAK:
        raise ValueError(f"audio {name} is silent (peak below {SILENCE_PEAK})")
    return wav, sr


def load_audio(source, target_sr):
    """Any file soundfile reads (path or bytes) -> mono float32 numpy (S,) at target_sr."""
    wav, sr = read_audio(source)
    return mo.resample(wav, sr, target_sr)


def open_image(image):
    """A path, bytes or PIL image -> 8-bit RGB PIL image. 16-bit grey is scaled to 8 bits first:
    convert() would clip it, and most of the picture would turn white."""
    from PIL import Image
    name = image if isinstance(image, (str, Path)) else "<image bytes>"
    try:
        with warnings.catch_warnings():  # PIL only warns between its pixel limit and twice it: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = image
            if not isinstance(im, Image.Image):
                im = Image.open(io.BytesIO(im) if isinstance(im, bytes) else im)
            if im.mode.startswith("I;16") or im.mode == "I":
                grey = np.asarray(im, dtype=np.float32) / GREY16_PER_GREY8
                im = Image.fromarray(grey.clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # (and UnidentifiedImageError)
        raise ValueError(f"cannot read image {name}: {e}") from e


def number(kind, fits, rule):
    """An argparse type: `kind(value)`, refused (argparse's message names the flag) unless fits(it)."""
    def parse(value):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not fits(x):
            raise argparse.ArgumentTypeError(f"{value} is not {rule}")
        return x
    return parse


positive = number(int, lambda n: n >= 1, "a positive number")
finite_at_least_0 = number(float, lambda x: 0 <= x < math.inf, "a number >= 0")
finite_above_0 = number(float, lambda x: 0 < x < math.inf, "a number > 0")
random_seed = number(int, lambda n: 0 <= n < 2 ** 63, "a seed from 0 to 2**63 - 1")  # what torch and numpy take

