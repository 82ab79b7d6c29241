"""train.py --prepare: a manifest of espeak-ng recordings -> parquet rows in the release's schema, read back by
our reader (and by the release's own, where a checkout of it is given), trained on, resumed, and bad lines named."""
import importlib.util
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

import minimind_o as mo
import data
import files
import side_assets
import train
from conftest import ROOT

REFERENCE_ENV = "MINIMIND_O_REFERENCE"  # a checkout (or `git archive`) of jingyaogong/minimind-o
ANSWERS = ["Two plus two is four.", "The sky is blue.", "It is a green square.", "Hello there.", "Goodbye."]
VOICE_TEXT = "This is my own voice, speaking for the voice prompt."


def espeak(text, voice=side_assets.ESPEAK_VOICE):
    """espeak-ng's speech for text: (S,) float32 at its own 22.05 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    raw = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    return sf.read(io.BytesIO(raw), dtype="float32")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder of recordings, at several rates and formats, mono and stereo, and an image."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("recordings")
    for i, text in enumerate(ANSWERS, 1):
        wav, sr = espeak(text)
        sf.write(folder / f"a{i}.wav", wav, sr)                                   # 22.05 kHz mono WAV
    wav, sr = espeak("What is two plus two?")
    loud = mo.resample(wav, sr, 44100)
    sf.write(folder / "q1.wav", np.stack([loud, 0.5 * loud], 1), 44100)          # 44.1 kHz stereo
    sf.write(folder / "q2.flac", mo.resample(wav, sr, 8000), 8000)                # 8 kHz FLAC
    wav, sr = espeak(VOICE_TEXT, "en-us+f3")
    sf.write(folder / "voice.wav", mo.resample(wav, sr, 48000), 48000)            # 48 kHz
    Image.new("RGB", (40, 30), (20, 200, 60)).save(folder / "square.png")
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Random-weight Mimi and CAM++ in their published layouts, as --prepare flags."""
    root = tmp_path_factory.mktemp("parts")
    mimi = side_assets.build_mimi(root, codebook_std=side_assets.MIMI_VARIED_CODEBOOK_STD)  # codes follow the sound
    return ["--mimi", str(mimi), "--campplus", str(side_assets.build_campplus(root)),
            "--device", "cpu"]


@pytest.fixture(scope="module")
def mimi(parts):
    return files.load_mimi(parts[1])


EXCHANGES = [  # T2A with a voice; A2A (stereo question); an image; two turns, one asked by voice (8 kHz FLAC)
    {"question": "What is two plus two?", "answer": ANSWERS[0], "answer_audio": "a1.wav", "voice": "voice.wav"},
    {"question_audio": "q1.wav", "question": "What is two plus two?", "answer": ANSWERS[1], "answer_audio": "a2.wav",
     "voice": "voice.wav"},
    {"question": "What is this?", "image": "square.png", "answer": ANSWERS[2], "answer_audio": "a3.wav"},
    {"turns": [{"question": "Hi!", "answer": ANSWERS[3], "answer_audio": "a4.wav"},
               {"question_audio": "q2.flac", "answer": ANSWERS[4], "answer_audio": "a5.wav"}], "voice": "voice.wav"},
]


def turns_of(exchange):
    return exchange.get("turns", [exchange])


def write_manifest(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def prepared(clips, parts):
    """The four exchanges prepared two lines a part: (summary, the parquet file)."""
    manifest = write_manifest(clips / "manifest.jsonl", EXCHANGES)
    out = str(clips / "mine.parquet")
    return train.main(["--prepare", manifest, out, "--prepare_chunk", "2", *parts]), out


def test_rows_hold_each_exchange_in_the_release_schema(prepared, clips, mimi, parts):
    summary, out = prepared
    assert (summary["rows"], summary["bad_lines"], summary["parts"]) == (4, [], 2)
    assert not os.path.exists(out + ".parts")                                   # joined, then removed
    schema = pq.read_schema(out)
    assert schema.names == ["conversations", "question_audios", "answer_audios", "image_bytes", "ref_audios",
                            "spk_emb"]
    rows = data.ParquetRows([out])
    t2a, a2a, image, turns = (rows.read(i) for i in range(4))
    assert t2a.conversations == [{"role": "user", "content": "What is two plus two?"},
                                 {"role": "assistant", "content": ANSWERS[0]}]
    assert t2a.question_audios == [] and t2a.image is None
    assert image.conversations[0]["content"] == f"{mo.IMAGE_MARK}\nWhat is this?"
    assert image.image == (clips / "square.png").read_bytes() and image.ref_codes is None and image.spk_emb is None
    assert [t["content"] for t in turns.conversations] == ["Hi!", ANSWERS[3], "", ANSWERS[4]]

    # question audio: 16 kHz mono WAV bytes of the recording, one entry per user turn (b"" if asked in text)
    heard, heard_sr = sf.read(io.BytesIO(a2a.question_audios[0]), dtype="float32")
    assert (heard_sr, heard.ndim) == (mo.SAMPLE_RATE_SPEECH, 1)
    np.testing.assert_allclose(heard, files.load_audio(clips / "q1.wav", mo.SAMPLE_RATE_SPEECH), atol=1 / 32768)
    assert turns.question_audios[0] == b"" and sf.info(io.BytesIO(turns.question_audios[1])).samplerate == 16000

    # the voice prompt: what files.clone_voice (chat.py --voice FILE) makes of the clip, the same for every row that names it
    voice = files.clone_voice(clips / "voice.wav", mimi, files.load_speaker_encoder(parts[3]))
    assert np.array_equal(t2a.ref_codes, voice["ref_codes"].T.flatten().numpy())
    np.testing.assert_array_equal(t2a.spk_emb, voice["spk_emb"].numpy())
    for row in (a2a, turns):
        assert np.array_equal(row.ref_codes, t2a.ref_codes) and np.array_equal(row.spk_emb, t2a.spk_emb)


def test_answer_codes_are_the_clips_mimi_codes_and_decode_back(prepared, clips, mimi):
    """The stored codes (encoded in padded batches) are what encoding each clip alone with the same Mimi
    gives, and they decode to a waveform as long as the clip (to the next whole frame)."""
    rows = data.ParquetRows([prepared[1]])
    answers = [a for i in range(len(rows)) for a in rows.read(i).answer_audios]
    assert len(answers) == len(ANSWERS)
    for i, flat in enumerate(answers, 1):
        codes = mo.frames_of(flat)                                                       # (8, F)
        wav = files.load_audio(clips / f"a{i}.wav", mo.SAMPLE_RATE_MIMI)
        assert codes.shape[1] == -(-len(wav) // mo.MIMI_FRAME_SAMPLES)
        assert len(set(codes[0].tolist())) > 1, "this Mimi gives every frame the same codes: nothing is tested"
        assert torch.equal(codes, mo.encode_audio_codes(mimi, wav))
        sound = mo.decode_audio_codes(mimi, codes)
        assert len(sound) == codes.shape[1] * mo.MIMI_FRAME_SAMPLES and np.isfinite(sound).all()


def test_batched_encoding_pads_without_changing_frames(mimi):
    wav = files.load_audio(side_assets.QUESTION_WAV, mo.SAMPLE_RATE_MIMI)
    clips = [wav, wav[:5000], wav[7000:20001], wav[:mo.MIMI_FRAME_SAMPLES]]
    batched = data.encode_in_batches(mimi, clips, batch_size=3)
    assert not torch.equal(batched[1], batched[2][:, :batched[1].shape[1]])  # the clips' codes differ
    for clip, codes in zip(clips, batched):
        assert torch.equal(codes, mo.encode_audio_codes(mimi, clip))


def labelled_codes(audio_labels):
    """(8, T) audio labels -> (8, F) the codes they teach, the stop id dropped."""
    layers = [row[row != mo.IGNORE] for row in torch.as_tensor(audio_labels)]
    assert all(layer[-1] == mo.AUDIO_STOP for layer in layers)
    return torch.stack([layer[:-1] for layer in layers])


def test_our_reader_makes_samples_of_every_kind(prepared, tokenizer):
    rows = data.ParquetRows([prepared[1]])
    encoders = data.Encoders(speech_frontend=side_assets.sensevoice_front_end(), image_processor=side_assets.siglip_image_processor())
    dataset = data.OmniDataset(rows, tokenizer, 512, encoders, augment="none", scheduled_sampling=0.0)
    for i in range(len(rows)):
        row, sample = rows.read(i), dataset[i]
        assert isinstance(sample, data.Sample), sample
        taught = labelled_codes(sample.audio_labels)
        reply = [torch.equal(taught, mo.frames_of(a)) for a in row.answer_audios].index(True)  # multi-turn: drawn
        exchange = EXCHANGES[i]
        assert (sample.speech is not None) == ("question_audio" in turns_of(exchange)[reply])
        assert (sample.image is not None) == ("image" in exchange)
        assert (sample.spk_emb is not None) == ("voice" in exchange)


def test_the_prepared_file_trains_with_data_unchanged(prepared, tmp_path, tokenizer_flag):
    root = tmp_path / "encoders"
    summary = train.main(["--data", prepared[1], "--from_weight", "none", "--out_dir", str(tmp_path),
                          "--speech_encoder", str(side_assets.build_sensevoice(root)),
                          "--vision_encoder", str(side_assets.build_siglip(root)), "--num_workers", "0",
                          "--max_steps", "2", "--batch_size", "2", "--max_seq_len", "256", "--hidden_size", "64",
                          "--num_hidden_layers", "2", *tokenizer_flag])
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"]) and summary["bad_rows"] == 0


class ReleaseAudioProcessor:
    """The interface the release's reader calls its audio_processor through (input_features and an
    attention mask), here over funasr's SenseVoice front end."""

    def __init__(self):
        self.frontend = side_assets.sensevoice_front_end()

    def __call__(self, wav, sampling_rate, return_tensors, return_attention_mask):
        assert sampling_rate == mo.SAMPLE_RATE_SPEECH
        feats = mo.speech_features(self.frontend, wav)                                   # (L, 560)
        return SimpleNamespace(input_features=feats[None], attention_mask=torch.ones(1, len(feats), dtype=torch.long))


def release_reader():
    """The release's dataset/omni_dataset.py module, from the checkout in $MINIMIND_O_REFERENCE."""
    folder = os.environ.get(REFERENCE_ENV)
    path = os.path.join(folder or "", "dataset", "omni_dataset.py")
    if not folder or not os.path.isfile(path):
        pytest.skip(f"set {REFERENCE_ENV} to a checkout of jingyaogong/minimind-o (one with dataset/omni_dataset.py) "
                    "to check that the release's own reader loads a prepared file")
    spec = importlib.util.spec_from_file_location("release_omni_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_release_reader_loads_a_prepared_file(prepared):
    from conftest import tokenizer_folder
    from transformers import AutoTokenizer
    reader = release_reader()
    random.seed(0)
    np.random.seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    dataset = reader.OmniDataset(prepared[1], tok, audio_processor=ReleaseAudioProcessor(),
                              vision_processor=side_assets.siglip_image_processor(), max_length=512, scheduled_sampling=0.0)
    rows = data.ParquetRows([prepared[1]])
    assert len(dataset) == len(rows)
    for i in range(len(dataset)):
        input_ids, text_labels, audio_labels, audio, audio_len, pixels, spk_emb = dataset[i]
        row = rows.read(i)
        exchange, taught = EXCHANGES[i], labelled_codes(audio_labels)
        reply = [torch.equal(taught, mo.frames_of(a)) for a in row.answer_audios].index(True)  # multi-turn: drawn
        np.testing.assert_array_equal(spk_emb.numpy(), row.spk_emb if "voice" in exchange else np.zeros(192))
        image_tokens = int((input_ids[mo.TEXT_ROW] == mo.IMAGE_PLACEHOLDER).sum())
        assert image_tokens == (mo.IMAGE_TOKENS if "image" in exchange else 0)
        assert bool(pixels["pixel_values"].any()) == ("image" in exchange)
        if "question_audio" in turns_of(exchange)[reply]:
            assert audio_len > 1 and audio.shape == (1, audio_len, mo.SPEECH_FEAT_DIM)
        else:
            assert audio_len == 0
        print(f"release reader, row {i}: {len(row.conversations)} turns, {taught.shape[1]} answer frames taught, "
              f"question audio {audio_len} frames, {image_tokens} image tokens, speaker embedding "
              f"{'yes' if spk_emb.any() else 'no'}")


def test_a_killed_run_resumes_keeping_finished_parts(clips, parts, monkeypatch):
    """Killed part-way (SIGKILL), a run started again makes only the parts that are missing, and the
    file has every row once, as an uninterrupted run writes it."""
    lines = [{"question": f"Question {i}?", "answer": text, "answer_audio": f"a{i}.wav"}
             for i, text in enumerate(ANSWERS, 1)]
    manifest = write_manifest(clips / "killed.jsonl", lines)
    whole, out = str(clips / "whole.parquet"), clips / "killed.parquet"
    train.main(["--prepare", manifest, whole, *parts])
    flags = ["--prepare", manifest, str(out), "--prepare_chunk", "1", *parts]
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder = clips / "killed.parquet.parts"
    finished = lambda: [n for n in os.listdir(folder) if n.startswith("part-")] if folder.exists() else []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not finished():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(finished())
    assert not out.exists() and 0 < kept < len(lines), "the run should have been killed part-way"

    made = []
    real = data.prepare_chunk
    monkeypatch.setattr(data, "prepare_chunk", lambda chunk, *args: made.append(chunk[0][0]) or real(chunk, *args))
    summary = train.main(flags)
    assert made == list(range(kept + 1, len(lines) + 1)) and summary["reused_parts"] == kept
    assert pq.read_table(out).equals(pq.read_table(whole))


BAD_LINES = [  # (manifest line, the start of its message after "<manifest>, line N: ")
    ('{"question": "Hi", "answer": "Hello", ', "not valid JSON"),
    ('["question", "answer"]', "expected a JSON object"),
    ({"question": "Hi", "answer": "Hello", "answer_wav": "a1.wav"}, "unknown key 'answer_wav'"),
    ({"turns": [{"question": "Hi", "answer": "Hello", "voice": "voice.wav"}]}, "turn 1: unknown key 'voice'"),
    ({"question": "Hi", "answer_audio": "a1.wav"}, "no answer"),
    ({"turns": [{"question": "Hi", "answer": "Hello"}, {"answer": "Bye"}]}, "turn 2: no question"),
    ({"question": "Hi", "answer": "Hello", "answer_audio": "nowhere.wav"},
     "answer_audio: audio file .*nowhere.wav not found"),
    ({"question_audio": "square.png", "answer": "Hello"}, "question_audio: cannot decode audio .*square.png"),
    ({"question": "Hi", "answer": "Hello", "image": "nowhere.png"}, "image: .*nowhere.png not found"),
    ({"question": "Hi", "answer": "Hello", "image": "a1.wav"}, "cannot read image .*a1.wav"),
    ({"question": "<image> Hi", "answer": "Hello"}, "the question has an <image> mark but the line has no image"),
    ({"question": "Hi", "answer": "Hello", "voice": "short.wav"}, "voice: voice clip .*short.wav is 0.50 s long"),
]


def test_each_bad_line_is_named_with_its_line_number(clips, parts):
    sf.write(clips / "short.wav", espeak("Hi")[0][:11025], 22050)
    good = {"question": "Hi", "answer": "Hello."}                                  # a text-only answer is fine
    manifest = write_manifest(clips / "bad.jsonl", [good] + [line for line, _ in BAD_LINES])
    out = str(clips / "bad.parquet")
    with pytest.raises(data.BadLine, match=f"^{manifest}, line 2: not valid JSON"):
        train.main(["--prepare", manifest, out, *parts])
    summary = train.main(["--prepare", manifest, out, "--skip_bad_rows", *parts])
    assert summary["rows"] == 1 and len(summary["bad_lines"]) == len(BAD_LINES)
    for n, (message, (_, expected)) in enumerate(zip(summary["bad_lines"], BAD_LINES), 2):
        assert re.match(f"{manifest}, line {n}: {expected}", message), message
    assert [len(a) for a in data.ParquetRows([out]).read(0).answer_audios] == [0]  # answered in text only


def test_prepare_errors_are_one_line(tmp_path, parts):
    done = subprocess.run([sys.executable, "train.py", "--prepare", str(tmp_path / "none.jsonl"), "x.parquet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"train.py: --prepare: manifest {tmp_path / 'none.jsonl'} not found\n"
    manifest = write_manifest(tmp_path / "m.jsonl", [{"question": "Hi", "answer": "Hello."}])
    with pytest.raises(FileNotFoundError, match=r"--mimi: Mimi codec: .*nowhere.* not found.*hf download kyutai"):
        train.main(["--prepare", manifest, str(tmp_path / "o.parquet"), "--mimi", str(tmp_path / "nowhere")])
