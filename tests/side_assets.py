"""Offline test assets for the frozen side modules: the real architectures with random weights, written in the
published folder layouts, so that tests load them through the same functions users call.

    build_sensevoice(dir)   SenseVoiceSmall/  config.yaml, configuration.json, model.pt, am.mvn and the CTC head's
                                              SentencePiece tokenizer (tiny encoder, 512-d output, 64 tokens)
    build_siglip(dir)       siglip2-base-p32-256-ve/  config.json, model.safetensors, preprocessor_config.json
    build_mimi(dir)         mimi/             tokenizer-e351c8d8-checkpoint125.safetensors (full Mimi)
    build_campplus(dir)     campplus/         campplus_cn_common.bin, configuration.json (full CAM++)
    make_speech_wavs(dir)   hello_16k.wav, question_24k.wav spoken by espeak-ng (committed under tests/data)

As a command, it writes all four into models/ under the names the entry points look for, and a voices.pt
cloned from the two clips, for a first try without the internet (their speech is noise, loudly said):

    python tests/side_assets.py --random_parts models
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimind_o as sm  # noqa: E402
import files  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
HELLO_WAV = DATA_DIR / "hello_16k.wav"
QUESTION_WAV = DATA_DIR / "question_24k.wav"
SEED = 0

# A SenseVoiceEncoderSmall small enough to run in milliseconds; only the output width (512) is kept from the
# published config (50 + 20 blocks, 2048 FFN units), because the audio projector depends on it.
TINY_SENSEVOICE = dict(output_size=sm.SPEECH_EMBED_DIM, attention_heads=4, linear_units=256, num_blocks=2,
                       tp_blocks=1, dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.1,
                       input_layer="pe", pos_enc_class="SinusoidalPositionEncoder", normalize_before=True,
                       kernel_size=11, sanm_shfit=0, selfattention_layer_type="sanm")
FULL_SENSEVOICE = dict(TINY_SENSEVOICE, linear_units=2048, num_blocks=50, tp_blocks=20)
TINY_VOCAB = 64                  # the published CTC head and its tokenizer have 25055 tokens; the ASR tests need a few
SENSEVOICE_BPE = "chn_jpn_yue_eng_ko_spectok.bpe.model"   # the published tokenizer file's name
TOKENIZER_TEXT = ["hello how are you today", "what time is it in paris", "the weather is nice today",
                  "你好 今天 天气 很好 我们 去 公园"]         # enough distinct characters for 64 BPE pieces

# SigLIP vision tower: width 768 as published (the vision projector depends on it), but 1 small layer.
TINY_SIGLIP = dict(hidden_size=sm.IMAGE_EMBED_DIM, intermediate_size=256, num_hidden_layers=1,
                   num_attention_heads=4)
FULL_SIGLIP = dict(hidden_size=sm.IMAGE_EMBED_DIM, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12)
SIGLIP_IMAGE_SIZE, SIGLIP_PATCH = 256, 32
SIGLIP_NORM = [0.5, 0.5, 0.5]                    # preprocessor_config.json of google/siglip2-base-patch32-256
SIGLIP_RESAMPLE_BILINEAR = 2                     # PIL.Image.BILINEAR, as in that config

MIMI_VARIED_CODEBOOK_STD = 0.01                  # measured: 3-7 distinct codes per layer in 21 frames of speech

ESPEAK_VOICE, ESPEAK_WPM = "en-us", 165
HELLO_TEXT = "Hello, how are you today?"
QUESTION_TEXT = "What time is it in Paris?"

DITHER_LEVEL = 1 / 32768   # one 16-bit step: the noise funasr's default dither adds
NOISE_FLOOR = 1e-2         # -40 dBFS (the clips' speech: rms 0.08): dither on top changes features < 0.01


# SenseVoiceSmall's published front end (config.yaml's frontend_conf): Kaldi fbank of 80 mels, 25 ms
# hamming windows every 10 ms, 7 frames stacked every 6 (low frame rate).
FRONTEND_CONF = dict(fs=sm.SAMPLE_RATE_SPEECH, window="hamming", n_mels=80, frame_length=25, frame_shift=10,
                     lfr_m=7, lfr_n=6)


def build_sensevoice(root, encoder_conf=TINY_SENSEVOICE):
    """Random SenseVoiceSmall (funasr's class) saved as model.pt + config.yaml + am.mvn; returns the folder."""
    import yaml
    with files.quiet_stdout():
        from funasr.models.sense_voice.model import SenseVoiceSmall
    folder = Path(root) / "SenseVoiceSmall"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = SenseVoiceSmall(encoder="SenseVoiceEncoderSmall", encoder_conf=encoder_conf,
                            input_size=sm.SPEECH_FEAT_DIM, vocab_size=TINY_VOCAB)
    torch.save(model.state_dict(), folder / "model.pt")
    config = {"encoder": "SenseVoiceEncoderSmall", "encoder_conf": encoder_conf, "model": "SenseVoiceSmall",
              "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
              "tokenizer": "SentencepiecesTokenizer",
              "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
              "frontend": "WavFrontend",
              "frontend_conf": FRONTEND_CONF}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # configuration.json tells funasr's AutoModel where the files are, as in the published folder
    metas = {"init_param": "model.pt", "config": "config.yaml", "tokenizer_conf": {"bpemodel": SENSEVOICE_BPE},
             "frontend_conf": {"cmvn_file": "am.mvn"}}
    (folder / "configuration.json").write_text(json.dumps(
        {"framework": "pytorch", "task": "auto-speech-recognition", "model": {"type": "funasr"},
         "file_path_metas": metas}, indent=2))
    write_bpe_tokenizer(folder / SENSEVOICE_BPE)
    write_am_mvn(folder / "am.mvn", HELLO_WAV)
    return folder


def write_bpe_tokenizer(path, vocab_size=TINY_VOCAB):
    """A SentencePiece BPE model of vocab_size pieces, in the format of SenseVoice's tokenizer file."""
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
                                   normalization_rule_name="identity", num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())


def sensevoice_front_end(cmvn_file=None):
    """funasr's own SenseVoice front end (WavFrontend) with the published settings: the reference our
    speech features are checked against. Undithered: its dither noise cannot be seeded (see with_noise_floor)."""
    with files.quiet_stdout():
        from funasr.frontends.wav_frontend import WavFrontend
    return WavFrontend(cmvn_file=None if cmvn_file is None else str(cmvn_file), **FRONTEND_CONF, dither=0.0)


def with_noise_floor(wav, level, seed=SEED):
    """The clip plus seeded Gaussian noise of std `level` (no digital silence left): like dithering, but the
    same every time."""
    return (wav + np.random.default_rng(seed).normal(0, level, wav.shape)).astype(np.float32)


def write_am_mvn(path, wav_path):
    """Kaldi-nnet CMVN file in am.mvn's format, with real statistics of one clip's LFR features (like the
    published am.mvn: the shift is minus the mean, about -8 to -17, the scale 1/std, unequal per dimension)."""
    wav = torch.from_numpy(with_noise_floor(files.load_audio(wav_path, sm.SAMPLE_RATE_SPEECH), DITHER_LEVEL))
    lfr = sensevoice_front_end()(wav[None], torch.tensor([wav.numel()]))[0][0]          # (L, 560)
    shift, scale = -lfr.mean(0), 1.0 / lfr.std(0).clamp(min=1e-3)
    vec = lambda v: " ".join(f"{x:.6f}" for x in v.tolist())
    dim = sm.SPEECH_FEAT_DIM
    path.write_text(f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n"
                    f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {vec(shift)} ]\n"
                    f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {vec(scale)} ]\n</Nnet>\n")


def siglip_image_processor():
    """transformers' SiglipImageProcessor with the published SigLIP2 settings."""
    from transformers import SiglipImageProcessor
    return SiglipImageProcessor(size={"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
                                resample=SIGLIP_RESAMPLE_BILINEAR, image_mean=SIGLIP_NORM, image_std=SIGLIP_NORM)


def build_siglip(root, vision_conf=TINY_SIGLIP):
    """Random SiglipVisionModel + SiglipImageProcessor saved with save_pretrained; returns the folder."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    folder = Path(root) / "siglip2-base-p32-256-ve"  # where chat.py looks by default
    torch.manual_seed(SEED)
    config = SiglipVisionConfig(image_size=SIGLIP_IMAGE_SIZE, patch_size=SIGLIP_PATCH, **vision_conf)
    SiglipVisionModel(config).save_pretrained(folder, safe_serialization=True)
    siglip_image_processor().save_pretrained(folder)
    return folder


def build_mimi(root, codebook_std=1.0):
    """moshi's Mimi with random weights, saved under the official file name; returns the file.
    codebook_std: the spread of the random codebook entries. With 1.0 they dwarf the random encoder's
    output, so the nearest entry is the same whatever the sound and every frame encodes to the same
    codes; MIMI_VARIED_CODEBOOK_STD makes the codes follow the sound (for tests of encoding)."""
    from moshi.models import loaders as moshi_loaders
    from safetensors.torch import save_file
    folder = Path(root) / "mimi"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    mimi = moshi_loaders.get_mimi(None, device="cpu")
    # A fresh Mimi's codebooks are all zeros (moshi learns them from data): every code would decode to the
    # same sound and tests could not tell codes apart. Random entries make each code decode differently.
    for name, buffer in mimi.state_dict().items():
        if name.endswith("_codebook.embedding_sum"):
            buffer.normal_(std=codebook_std)
    path = folder / files.MIMI_WEIGHTS
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, path)
    return path


def build_campplus(root):
    """funasr's CAM++ with random weights in the published layout; returns the folder."""
    with files.quiet_stdout():
        from funasr.models.campplus.model import CAMPPlus
    folder = Path(root) / "campplus"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = CAMPPlus(feat_dim=sm.SPK_MEL["n_mels"], embedding_size=sm.SPK_EMBED_DIM)
    torch.save(model.state_dict(), folder / files.CAMPP_WEIGHTS)
    meta = {"framework": "pytorch", "task": "speaker-verification",
            "model": {"type": "cam++-sv", "pretrained_model": files.CAMPP_WEIGHTS,
                      "model_config": {"sample_rate": sm.SAMPLE_RATE_SPEECH, "fbank_dim": sm.SPK_MEL["n_mels"],
                                       "emb_size": sm.SPK_EMBED_DIM}}}
    (folder / "configuration.json").write_text(json.dumps(meta, indent=2))
    return folder


def make_speech_wavs(out_dir=DATA_DIR):
    """Regenerate the two committed espeak-ng clips (16-bit PCM, mono). Needs `apt-get install espeak-ng`."""
    import soundfile as sf
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng not found: apt-get install -y espeak-ng")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for text, path, rate in ((HELLO_TEXT, out_dir / HELLO_WAV.name, sm.SAMPLE_RATE_SPEECH),
                             (QUESTION_TEXT, out_dir / QUESTION_WAV.name, sm.SAMPLE_RATE_MIMI)):
        raw = subprocess.run(["espeak-ng", "-v", ESPEAK_VOICE, "-s", str(ESPEAK_WPM), "--stdout", text],
                             check=True, capture_output=True).stdout
        sf.write(path, files.load_audio(raw, rate), rate, subtype="PCM_16")


def build_all(root):
    """Every asset into root; returns a dict of the paths the loaders take."""
    return {"sensevoice": build_sensevoice(root), "siglip": build_siglip(root), "mimi": build_mimi(root),
            "campplus": build_campplus(root)}


RANDOM_WARNING = """
  *** These side modules have RANDOM weights. ***
  They are the real architectures in their published formats, so chat.py (--web too), train.py --prepare and
  benchmarks/evaluate.py run end to end without the internet, but what they hear is meaningless and the speech
  they make is noise. For real speech, replace them: python chat.py --download (or the commands it names).
"""


def write_random_parts(root):
    """build_all(root) plus root/voices.pt holding a voice cloned (by the random Mimi and CAM++) from each clip."""
    paths = build_all(root)
    mimi, campp = files.load_mimi(paths["mimi"]), files.load_speaker_encoder(paths["campplus"])
    for name, clip in (("hello", HELLO_WAV), ("question", QUESTION_WAV)):
        files.save_voice(Path(root) / "voices.pt", name, files.clone_voice(clip, mimi, campp))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description="Offline assets: the side modules with random weights, or the test clips.")
    p.add_argument("--random_parts", metavar="DIR", help="write Mimi, SenseVoice, SigLIP2, CAM++ (random weights) "
                   "and voices.pt into DIR, e.g. models")
    p.add_argument("--speech", action="store_true", help="speak tests/data's two clips again with espeak-ng")
    args = p.parse_args(argv)
    if not (args.random_parts or args.speech):
        p.error("give --random_parts DIR or --speech")
    if args.speech:
        make_speech_wavs()
        print({p.name: p.stat().st_size for p in (HELLO_WAV, QUESTION_WAV)})
    if args.random_parts:
        print(RANDOM_WARNING, file=sys.stderr)
        for part, path in write_random_parts(args.random_parts).items():
            print(f"{part}: {path}")
        print(f"voices: {Path(args.random_parts) / 'voices.pt'} (hello, question)")
        print(RANDOM_WARNING, file=sys.stderr)


if __name__ == "__main__":
    main()
