"""Tests of the frozen side-module adapters, on random-weight models in the published layouts (side_assets.py)."""
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import chat
import side_assets as assets
import minimind_o as sm
import files

SHARED = Path(__file__).resolve().parents[2] / "shared"   # ../shared beside the project
FRAME_HOP = sm.SAMPLE_RATE_SPEECH // 100        # the fbank's 10 ms shift
FRAME_WIN = sm.SAMPLE_RATE_SPEECH * 25 // 1000  # and its 25 ms window
LFR_HOP = 6                                     # low frame rate: one stacked frame per 6 fbank frames
STREAM_TEST_FRAMES = 4              # not a multiple of 3, so the 3-frame decoder also exercises flush()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return assets.build_all(tmp_path_factory.mktemp("side_assets"))


@pytest.fixture(scope="session")
def speech(built):
    return files.load_speech_encoder(built["sensevoice"])


@pytest.fixture(scope="session")
def vision(built):
    return files.load_vision_encoder(built["siglip"])


@pytest.fixture(scope="session")
def mimi(built):
    return files.load_mimi(built["mimi"])


@pytest.fixture(scope="session")
def campp(built):
    return files.load_speaker_encoder(built["campplus"])


@pytest.fixture(scope="session")
def hello16():
    return files.load_audio(assets.HELLO_WAV, sm.SAMPLE_RATE_SPEECH)


@pytest.fixture(scope="session")
def question16():
    return files.load_audio(assets.QUESTION_WAV, sm.SAMPLE_RATE_SPEECH)


def write_wav(path, wav, sr):
    sf.write(path, wav, sr, subtype="PCM_16")
    return path


# --- audio I/O ---------------------------------------------------------------------------------------------

def test_load_audio_resamples_and_downmixes(tmp_path, hello16):
    sr = 44100
    left = files.load_audio(assets.HELLO_WAV, sr)
    stereo = np.stack([left, 0.5 * left], axis=1)
    path = write_wav(tmp_path / "stereo.flac", stereo, sr)
    wav = files.load_audio(path, sm.SAMPLE_RATE_SPEECH)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - hello16.size) <= 1
    np.testing.assert_allclose(wav, 0.75 * hello16[:wav.size], atol=1e-2)   # the channel mean
    assert np.array_equal(files.load_audio(path.read_bytes(), sm.SAMPLE_RATE_SPEECH), wav)


def test_load_audio_bad_inputs_name_the_file(tmp_path):
    silent = write_wav(tmp_path / "silent.wav", np.zeros(sm.SAMPLE_RATE_SPEECH), sm.SAMPLE_RATE_SPEECH)
    with pytest.raises(ValueError, match="silent.wav is silent"):
        files.load_audio(silent, sm.SAMPLE_RATE_SPEECH)
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0), sm.SAMPLE_RATE_SPEECH)
    with pytest.raises(ValueError, match="empty.wav lasts 0.0 ms"):
        files.load_audio(empty, sm.SAMPLE_RATE_SPEECH)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    with pytest.raises(ValueError, match="cannot decode audio .*garbage.wav"):
        files.load_audio(garbage, sm.SAMPLE_RATE_SPEECH)
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        files.load_audio(tmp_path / "nowhere.wav", sm.SAMPLE_RATE_SPEECH)
    click = write_wav(tmp_path / "click.wav", np.full(160, 0.5), sm.SAMPLE_RATE_SPEECH)  # 10 ms
    with pytest.raises(ValueError, match="click.wav lasts 10.0 ms, less than one 25 ms analysis window"):
        files.load_audio(click, sm.SAMPLE_RATE_SPEECH)


# --- speech encoder ------------------------------------------------------------------------------------------

def funasr_features(folder, wav, dither):
    """funasr's own SenseVoice front end as funasr builds it from the published folder (its dither:
    fresh noise from the global generator)."""
    import yaml
    with files.quiet_stdout():
        from funasr.frontends.wav_frontend import WavFrontend
    conf = yaml.safe_load((folder / "config.yaml").read_text())["frontend_conf"]
    front = WavFrontend(cmvn_file=str(folder / "am.mvn"), **dict(conf, dither=dither))
    return front(torch.from_numpy(wav)[None], torch.tensor([wav.size]))[0][0]


def test_speech_features_are_funasrs_dithered_front_end_and_repeat(built, speech, hello16):
    """funasr dithers by default (the published config keeps it): digital silence, 27% of this clip, then
    reads as a quiet room, not log(eps). Ours draws the same noise level from a fixed seed."""
    ours = sm.speech_features(speech.frontend, hello16)
    assert torch.equal(ours, sm.speech_features(speech.frontend, hello16))
    torch.manual_seed(0)
    theirs, undithered = funasr_features(built["sensevoice"], hello16, 1.0), funasr_features(built["sensevoice"], hello16, 0.0)
    assert ours.shape == theirs.shape
    # measured: 0.016 from funasr's (a different draw of the same noise), 0.31 without dither
    assert (ours - theirs).abs().mean() < 0.05 < 0.2 < (undithered - theirs).abs().mean()
    silence = np.zeros(3 * sm.SAMPLE_RATE_SPEECH, np.float32)
    torch.manual_seed(0)  # funasr's noise comes from the global generator
    ours, theirs = sm.speech_features(speech.frontend, silence), funasr_features(built["sensevoice"], silence, 1.0)
    torch.testing.assert_close(ours.mean(0), theirs.mean(0), atol=0.4, rtol=0)  # each band's level


def test_encoder_input_is_funasr_front_end_with_the_folder_cmvn(speech, built, hello16):
    """What encode_speech hands the SenseVoice encoder is funasr's own WavFrontend output with the folder's
    am.mvn applied, (x + shift) * scale. The CMVN is a real one (shift -8 to -17, scale 0.1 to 0.3), so a
    sign or order slip moves every feature by about 2 |shift| scale, ~4."""
    with files.quiet_stdout():
        from funasr.frontends.wav_frontend import load_cmvn
    am_mvn = built["sensevoice"] / "am.mvn"
    shift, scale = load_cmvn(str(am_mvn))[:, :sm.SPEECH_FEAT_DIM]
    assert shift.abs().min() > 5 and 0.05 < scale.min() < scale.max() < 0.5
    wav = assets.with_noise_floor(hello16, assets.NOISE_FLOOR)  # dithered or not, both see the same signal
    encoder = next(m for m in speech.modules() if type(m).__name__ == "SenseVoiceEncoderSmall")
    fed = []
    hook = encoder.register_forward_pre_hook(lambda module, args: fed.append(args[0].clone()))  # it scales in place
    try:
        sm.encode_speech(speech, [wav])
    finally:
        hook.remove()
    theirs, lengths = assets.sensevoice_front_end(am_mvn)(torch.from_numpy(wav)[None], torch.tensor([wav.size]))
    assert fed[0].shape == theirs.shape == (1, int(lengths[0]), sm.SPEECH_FEAT_DIM)
    torch.testing.assert_close(fed[0], theirs, atol=2e-2, rtol=0)


def test_speech_shapes_and_valid_lengths(speech, hello16, question16):
    clips = [hello16, question16, hello16[:sm.SAMPLE_RATE_SPEECH]]
    outs = sm.encode_speech(speech, clips)
    for wav, out in zip(clips, outs):
        fbank_frames = 1 + (wav.size - FRAME_WIN) // FRAME_HOP
        assert out.shape == (math.ceil(fbank_frames / LFR_HOP), sm.SPEECH_EMBED_DIM)
        assert torch.isfinite(out).all()


def test_speech_batch_equals_one_by_one(speech, hello16, question16):
    clips = [question16, hello16[:sm.SAMPLE_RATE_SPEECH], hello16]
    batched = sm.encode_speech(speech, clips)
    for wav, out in zip(clips, batched):
        torch.testing.assert_close(out, sm.encode_speech(speech, [wav])[0], atol=1e-4, rtol=1e-4)


def test_speech_encoder_missing_files(built, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing_here/config.yaml not found.*hf download FunAudioLLM/SenseVoiceSmall"):
        with files.loading("sensevoice", tmp_path / "nothing_here"):
            files.load_speech_encoder(tmp_path / "nothing_here")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_bytes((built["sensevoice"] / "config.yaml").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"partial/model.pt not found"):
        files.load_speech_encoder(partial)


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 936291369\n")


@pytest.mark.parametrize("part, file, load, download", [
    ("sensevoice", "model.pt", files.load_speech_encoder, "FunAudioLLM/SenseVoiceSmall"),
    ("sensevoice", "am.mvn", files.load_speech_encoder, "FunAudioLLM/SenseVoiceSmall"),
    ("sensevoice", "config.yaml", files.load_speech_encoder, "FunAudioLLM/SenseVoiceSmall"),
    ("siglip", "model.safetensors", files.load_vision_encoder, "jingyaogong/siglip2-base-p32-256-ve"),
    ("mimi", files.MIMI_WEIGHTS, files.load_mimi, "kyutai/moshiko-pytorch-bf16"),
    ("campplus", files.CAMPP_WEIGHTS, files.load_speaker_encoder, "funasr/campplus")])
def test_damaged_files_are_named_with_how_to_get_them(built, tmp_path, part, file, load, download):
    """A clone without git-lfs leaves pointer files: the entry points' `loading` says which part, where
    it is, and the command that gets a good copy."""
    folder = tmp_path / part
    shutil.copytree(built[part] if built[part].is_dir() else built[part].parent, folder)
    (folder / file).write_bytes(LFS_POINTER)
    with pytest.raises(files.DamagedPartError, match=rf"cannot read the .* at {folder} .*hf download {download}"):
        with files.loading(part, folder):
            load(folder)


def test_damaged_tokenizer_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(LFS_POINTER)
    with pytest.raises(files.DamagedPartError, match="cannot read the tokenizer .*hf download jingyaogong/minimind-3o"):
        with files.loading("tokenizer", tmp_path):
            sm.load_tokenizer(tmp_path)


def test_cmvn_of_the_wrong_size_is_refused(built, tmp_path):
    folder = tmp_path / "sensevoice"
    shutil.copytree(built["sensevoice"], folder)
    (folder / "am.mvn").write_text("<Nnet>\n</Nnet>\n")
    with pytest.raises(ValueError, match="am.mvn: expected a shift and a scale of 560 values"):
        files.load_speech_encoder(folder)


# --- vision encoder ------------------------------------------------------------------------------------------

def image_inputs(tmp_path):
    rng = np.random.default_rng(0)
    rgb_path = tmp_path / "rgb.png"
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(rgb_path)
    gray = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(gray, format="JPEG")
    rgba = Image.fromarray(rng.integers(0, 256, (256, 256, 4), dtype=np.uint8), mode="RGBA")
    return [rgb_path, gray.getvalue(), rgba]


def test_images_shape_and_batching(vision, tmp_path):
    model, processor = vision
    images = [files.open_image(image) for image in image_inputs(tmp_path)]  # a path, JPEG bytes, RGBA
    out = sm.encode_images(model, processor, images)
    assert out.shape == (len(images), sm.IMAGE_TOKENS, sm.IMAGE_EMBED_DIM)
    for i, image in enumerate(images):
        torch.testing.assert_close(sm.encode_images(model, processor, [image])[0], out[i], atol=1e-4, rtol=1e-4)


def test_16_bit_grey_and_one_pixel_tall_images(vision, tmp_path):
    model, processor = vision
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # a 16-bit PNG, PIL mode I;16
    as8 = Image.fromarray((ramp // 257).astype(np.uint8), mode="L")
    torch.testing.assert_close(sm.image_pixels(processor, [files.open_image(tmp_path / "grey16.png")]),
                               sm.image_pixels(processor, [as8.convert("RGB")]), atol=0.01, rtol=0)  # not clipped to white
    for height in (1, 3):  # shapes transformers would otherwise take for channels-first
        strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, 500, 3), dtype=np.uint8))
        pixels = sm.image_pixels(processor, [strip])
        stretched = np.asarray(strip.resize((256, 256), Image.BILINEAR), np.float32) / 127.5 - 1
        assert pixels.shape == (1, 3, 256, 256)
        torch.testing.assert_close(pixels[0], torch.from_numpy(stretched).permute(2, 0, 1), atol=0.02, rtol=0)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        files.open_image(bad)


@pytest.mark.parametrize("limit", [100, 1000])  # a 40x30 picture is then over twice PIL's limit (its error), or
def test_a_decompression_bomb_image_is_refused_by_name(tmp_path, monkeypatch, limit):  # just over (a warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (40, 30)).save(bomb)
    with pytest.raises(ValueError, match="cannot read image .*bomb.png: .*decompression bomb"):
        files.open_image(bomb)


def test_googles_whole_siglip2_folder_loads_as_its_vision_tower(tmp_path):
    """PARTS offers google/siglip2-base-patch32-256 (text and vision towers): the loader keeps the vision one."""
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(0)
    vision = dict(image_size=assets.SIGLIP_IMAGE_SIZE, patch_size=assets.SIGLIP_PATCH, **assets.TINY_SIGLIP)
    whole = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                          num_hidden_layers=1, num_attention_heads=2)))
    folder = assets.build_siglip(tmp_path)  # the release's layout, whose processor files are the same
    whole.save_pretrained(folder, safe_serialization=True)
    encoder, processor = files.load_vision_encoder(folder)
    pixels = sm.image_pixels(processor, [files.open_image(image_inputs(tmp_path)[0])])
    with torch.no_grad():
        assert torch.equal(encoder(pixel_values=pixels).last_hidden_state,
                           whole.vision_model(pixel_values=pixels).last_hidden_state)
    assert "google/siglip2-base-patch32-256 --local-dir models/siglip2-base-p32-256-ve" in files.PARTS["siglip"].how


def test_vision_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"siglip/config.json not found.*hf download jingyaogong/siglip2"):
        with files.loading("siglip", tmp_path / "siglip"):
            files.load_vision_encoder(tmp_path / "siglip")


# --- Mimi ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def question_codes(mimi):
    return sm.encode_audio_codes(mimi, files.load_audio(assets.QUESTION_WAV, sm.SAMPLE_RATE_MIMI))


def test_mimi_codes(question_codes):
    samples = sf.info(assets.QUESTION_WAV).frames
    assert question_codes.shape == (sm.N_CODEBOOKS, math.ceil(samples / sm.MIMI_FRAME_SAMPLES))
    assert question_codes.dtype == torch.int64
    assert 0 <= question_codes.min() and question_codes.max() < 2048


@pytest.fixture(scope="session")
def stream_codes(question_codes):
    return question_codes[:, :STREAM_TEST_FRAMES]


@pytest.fixture(scope="session")
def stream_whole(mimi, stream_codes):
    return sm.decode_audio_codes(mimi, stream_codes)


@pytest.mark.parametrize("frames_per_call", [1, 3])
def test_mimi_streaming_equals_whole(mimi, stream_codes, stream_whole, frames_per_call):
    assert stream_whole.shape == (STREAM_TEST_FRAMES * sm.MIMI_FRAME_SAMPLES,)
    speech = chat.SpeechOut(mimi, frames_per_call, background=False, first_call_frames=frames_per_call)
    for frame in stream_codes.T:
        speech.put(frame)
    streamed = speech.close()
    assert {c.size for c in speech.pcm[:-1]} == {frames_per_call * sm.MIMI_FRAME_SAMPLES}  # the last may be shorter
    np.testing.assert_allclose(streamed, stream_whole, atol=1e-5)


def test_mimi_codes_decode_to_different_sounds(mimi, stream_codes, stream_whole):
    other = sm.decode_audio_codes(mimi, (stream_codes + 1) % 2048)   # the test codec's codebooks are random
    assert np.abs(other - stream_whole).max() > 1e-3


def test_mimi_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{files.MIMI_WEIGHTS} not found.*hf download kyutai/moshiko-pytorch-bf16"):
        with files.loading("mimi", tmp_path):
            files.load_mimi(tmp_path)


# --- CAM++ and voices ----------------------------------------------------------------------------------------

def test_speaker_embedding(campp, hello16):
    feats = sm.speaker_features(hello16)
    assert feats.shape == (hello16.size // sm.SPK_MEL["hop"] + 1, sm.SPK_MEL["n_mels"])
    torch.testing.assert_close(feats.mean(0), torch.zeros(sm.SPK_MEL["n_mels"]), atol=1e-4, rtol=0)
    emb = sm.speaker_embedding(campp, hello16)
    assert emb.shape == (sm.SPK_EMBED_DIM,) and emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_speaker_encoder_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"campplus_cn_common.bin not found.*hf download funasr/campplus"):
        with files.loading("campplus", tmp_path):
            files.load_speaker_encoder(tmp_path)


def test_clone_save_and_load_voice(mimi, campp, tmp_path):
    voice = files.clone_voice(assets.QUESTION_WAV, mimi, campp)
    samples = sf.info(assets.QUESTION_WAV).frames
    assert voice["ref_codes"].shape == (sm.N_CODEBOOKS, math.ceil(samples / sm.MIMI_FRAME_SAMPLES))
    assert voice["spk_emb"].shape == (sm.SPK_EMBED_DIM,)
    voices_path = tmp_path / "voices.pt"
    files.save_voice(voices_path, "question", voice)
    files.save_voice(voices_path, "copy", voice)
    loaded = files.load_voices(voices_path)
    assert sorted(loaded) == ["copy", "question"]
    assert torch.equal(loaded["question"]["ref_codes"], voice["ref_codes"])


def test_a_save_that_fails_midway_leaves_every_stored_voice(tmp_path, monkeypatch):
    voices_path = tmp_path / "voices.pt"
    voice = {"ref_codes": torch.zeros(8, 3, dtype=torch.long), "spk_emb": torch.zeros(192)}
    files.save_voice(voices_path, "kept", voice)
    before = voices_path.read_bytes()

    def dies_halfway(obj, f):  # a full disk or a kill: half a file written, then the error
        Path(f).write_bytes(before[:len(before) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        files.save_voice(voices_path, "new", voice)
    assert voices_path.read_bytes() == before and sorted(files.load_voices(voices_path)) == ["kept"]
    assert [p.name for p in tmp_path.iterdir()] == ["voices.pt"]  # no temporary file left behind


def test_a_wav_write_that_fails_midway_leaves_the_previous_reply(tmp_path, monkeypatch):
    out = tmp_path / "reply.wav"
    chat.write_wav(out, np.zeros(2400, np.float32))
    before = out.read_bytes()

    def dies_halfway(path, *args, **kwargs):
        Path(path).write_bytes(b"RIFF")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sf, "write", dies_halfway)
    with pytest.raises(OSError):
        chat.write_wav(out, np.ones(2400, np.float32))
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["reply.wav"]


def test_clone_keeps_at_most_max_ref_frames(mimi, campp, monkeypatch):
    monkeypatch.setattr(files, "MAX_REF_FRAMES", 5)    # the 300-frame cap, scaled down to keep the test fast
    voice = files.clone_voice(assets.QUESTION_WAV, mimi, campp)
    assert voice["ref_codes"].shape == (sm.N_CODEBOOKS, 5)


@pytest.mark.parametrize("edit, message", [
    (lambda w: w[:sm.SAMPLE_RATE_SPEECH // 2], "long; at least"),
    (lambda w: w * 1e-3, "too quiet"),
    (lambda w: np.clip(w * 10, -1, 1), "clipped"),
])
def test_clone_rejects_bad_clips(mimi, campp, hello16, tmp_path, edit, message):
    path = write_wav(tmp_path / "clip.wav", edit(hello16), sm.SAMPLE_RATE_SPEECH)
    with pytest.raises(ValueError, match=f"clip.wav.*{message}"):
        files.clone_voice(path, mimi, campp)


def test_released_voices_load():
    path = SHARED / "voices" / "voices.pt"
    if not path.is_file():
        pytest.skip(f"{path} absent: the release's voices live in ../shared, which this checkout lacks")
    voices = files.load_voices(path)
    assert len(voices) == 5
    assert all(v["ref_codes"].shape[1] <= files.MAX_REF_FRAMES for v in voices.values())


# --- voice activity ------------------------------------------------------------------------------------------

def vad_events(wav):
    vad = chat.VoiceActivity()
    usable = wav.size // chat.VAD_CHUNK * chat.VAD_CHUNK
    events = [vad(chunk) for chunk in wav[:usable].reshape(-1, chat.VAD_CHUNK)]
    return [e for e in events if e]


def test_vad_finds_speech_then_its_end(hello16):
    pause = np.zeros(sm.SAMPLE_RATE_SPEECH, dtype=np.float32)
    assert vad_events(np.concatenate([pause, hello16, pause])) == ["start", "end"]


def test_vad_ignores_silence_and_hiss():
    hiss = np.random.default_rng(0).normal(0, 1e-3, 3 * sm.SAMPLE_RATE_SPEECH).astype(np.float32)
    assert vad_events(np.zeros_like(hiss)) == []
    assert vad_events(hiss) == []


def test_vad_rejects_wrong_chunk_size():
    with pytest.raises(ValueError, match="chunks of 512 samples"):
        chat.VoiceActivity()(np.zeros(chat.VAD_CHUNK - 1, dtype=np.float32))


def test_the_random_parts_command_fills_every_default_place_and_says_they_are_random(tmp_path, capsys):
    assets.main(["--random_parts", str(tmp_path)])
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "speech" in err and "noise" in err
    args = chat.parse_args(["--text", "hi", "--mimi", str(tmp_path / "mimi"), "--sensevoice", str(tmp_path / "SenseVoiceSmall"),
                            "--siglip", str(tmp_path / "siglip2-base-p32-256-ve"), "--campplus", str(tmp_path / "campplus"),
                            "--voices", str(tmp_path / "voices.pt")])
    assert files.missing_report(args, ["mimi", "sensevoice", "siglip", "campplus", "voices"]) is None
    assert sorted(files.load_voices(tmp_path / "voices.pt")) == ["hello", "question"]
