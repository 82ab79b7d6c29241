"""Bad input that once got through: each is refused with one line naming what is wrong, before anything is
written or trained on."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import chat
import files
import minimind_o as mo

RATE = mo.SAMPLE_RATE_SPEECH


def float_wav(path, wav):
    sf.write(str(path), wav.astype(np.float32), RATE, subtype="FLOAT")  # a float file can hold NaN
    return str(path)


def a_voice(codes=0, spk=0.0):
    return {"ref_codes": torch.full((mo.N_CODEBOOKS, 3), codes, dtype=torch.long),
            "spk_emb": torch.full((mo.SPK_EMBED_DIM,), spk)}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_audio_that_is_not_numbers_is_refused_where_it_is_read(tmp_path, bad):
    wav = 0.1 * np.sin(np.arange(RATE) / 10)
    wav[RATE // 2] = bad
    path = float_wav(tmp_path / "nan.wav", wav)
    with pytest.raises(ValueError, match="nan.wav holds samples that are not numbers"):
        files.read_audio(path)
    with pytest.raises(ValueError, match="not numbers"):  # uploads arrive as bytes
        files.read_audio(open(path, "rb").read())
    with pytest.raises(ValueError, match="not numbers"):  # a voice is never cloned from it
        files.clone_voice(path, mimi=None, campp=None)


@pytest.mark.parametrize("voice, message", [
    (a_voice(codes=mo.CODEBOOK_SIZE), "ref_codes outside the codebook"),
    (a_voice(codes=-1), "ref_codes outside the codebook"),
    (a_voice(spk=float("nan")), "spk_emb holds values that are not numbers"),
])
def test_a_voices_file_with_codes_off_the_codebook_or_nan_embeddings_is_named(tmp_path, voice, message):
    path = tmp_path / "voices.pt"
    torch.save({"alice": voice}, path)
    with pytest.raises(ValueError, match=f"voice 'alice' in .*voices.pt: {message}"):
        files.load_voices(path)
    with pytest.raises(ValueError, match=message):
        files.save_voice(tmp_path / "mine.pt", "bob", voice)
    assert not (tmp_path / "mine.pt").exists()


@pytest.mark.parametrize("name", ["", "a/b", "none", "None", "two words", "me.wav"])
def test_voice_names_that_could_never_be_chosen_are_refused_when_saving(tmp_path, capsys, name):
    with pytest.raises(ValueError, match="use letters, digits"):
        files.save_voice(tmp_path / "mine.pt", name, a_voice())
    assert not (tmp_path / "mine.pt").exists()
    clip = float_wav(tmp_path / "clip.wav", 0.1 * np.sin(np.arange(2 * RATE) / 10))
    with pytest.raises(SystemExit):
        chat.parse_args(["--voice", clip, "--save_voice", name, "--text", "hi"])
    assert "--save_voice: voice name" in capsys.readouterr().err


def test_a_good_voice_name_is_kept(tmp_path):
    files.save_voice(tmp_path / "mine.pt", "bob_2-b", a_voice())
    assert list(files.load_voices(tmp_path / "mine.pt")) == ["bob_2-b"]


def test_more_threads_than_cores_is_refused(capsys):
    with pytest.raises(SystemExit):
        chat.parse_args(["--threads", "100000", "--text", "hi"])
    assert "argument --threads: 100000 is not a number of threads from 1 to this machine's" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [str(2 ** 64), "-1"])
def test_a_seed_torch_cannot_take_is_refused_as_a_flag(capsys, seed):
    import train
    for parse in (chat.parse_args, train.parse_args):
        with pytest.raises(SystemExit):
            parse(["--seed", seed])
        assert f"argument --seed: {seed} is not a seed from 0 to 2**63 - 1" in capsys.readouterr().err


def test_a_checkpoint_with_damaged_bytes_is_refused_not_answered_with(tmp_path):
    model = mo.MiniMindO(mo.OmniConfig(hidden_size=64, num_hidden_layers=2, talker_hidden_size=64,
                                       num_talker_hidden_layers=1))
    path = tmp_path / "model.pth"
    files.save_checkpoint(model, path)
    state = files.read_checkpoint(path)
    state["model.norm.weight"][3] = float("nan")  # what 4 KB of random float16 bytes almost surely hold
    torch.save(state, path)
    with pytest.raises(ValueError, match="model.pth: 1 tensors hold values that are not numbers .*model.norm.weight "
                                         "first: the file is damaged"):
        files.load_model(path)


# -- training's own files: a full disk, a damaged file -------------------------------------------------

TINY_RUN = ["--max_seq_len", "64", "--batch_size", "4", "--hidden_size", "64", "--num_hidden_layers", "2",
            "--num_workers", "0", "--save_every", "0"]


def test_a_truncated_resume_state_or_voices_file_is_named_not_unpickled_into_a_traceback(tmp_path, tokenizer_flag):
    import train
    flags = ["--out_dir", str(tmp_path), "--max_steps", "1", *TINY_RUN, *tokenizer_flag]
    train.main(flags)
    for path in (tmp_path / "demo_resume.pt", tmp_path / "voices.pt"):
        if path.name == "voices.pt":
            files.save_voice(path, "bob", a_voice())
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError, match="--resume: cannot read .*demo_resume.pt .*it is damaged. Start afresh"):
        train.main([*flags, "--resume"])
    with pytest.raises(ValueError, match="cannot read the voices file .*voices.pt .*is it damaged"):
        files.save_voice(tmp_path / "voices.pt", "alice", a_voice())


def failing_writes(monkeypatch, module, ends_with, after=0):
    """module's open() of a file named ...ends_with fails as on a full disk, after `after` successful opens."""
    opened = []

    def open_or_fail(path, *args, **kwargs):
        if str(path).endswith(ends_with):
            opened.append(path)
            if len(opened) > after:
                raise OSError(28, "No space left on device")
        return open(path, *args, **kwargs)
    monkeypatch.setattr(module, "open", open_or_fail, raising=False)


def test_an_out_dir_that_cannot_be_written_is_one_line_before_any_training(tmp_path, tokenizer_flag, monkeypatch):
    import train
    failing_writes(monkeypatch, train, ".lock")
    with pytest.raises(train.SaveFailed, match=r"cannot write .*demo.lock: .*No space left on device .*is it full, or "
                                               r"not writable\?\). Nothing was trained"):
        train.main(["--out_dir", str(tmp_path), "--max_steps", "1", *TINY_RUN, *tokenizer_flag])
    assert not (tmp_path / "demo_64.pth").exists()


def test_metrics_that_cannot_be_written_stop_the_run_keeping_the_lines_before(tmp_path, tokenizer_flag, monkeypatch):
    import train
    failing_writes(monkeypatch, train, "metrics.jsonl", after=2)  # the first open makes the file, then two steps
    with pytest.raises(train.SaveFailed, match="cannot write .*demo_metrics.jsonl: .*Its lines before this step are kept"):
        train.main(["--out_dir", str(tmp_path), "--max_steps", "4", "--log_every", "1", *TINY_RUN, *tokenizer_flag])
    assert [json.loads(line)["step"] for line in open(tmp_path / "demo_metrics.jsonl")] == [1, 2]


def test_an_out_file_that_cannot_be_written_is_refused_before_any_reply(tmp_path, capsys):
    with pytest.raises(SystemExit):
        chat.parse_args(["--text", "hi", "--out", str(tmp_path / "no such folder" / "reply.wav")])
    assert "--out" in (err := capsys.readouterr().err) and "cannot write in" in err and "No such file or directory" in err
    assert chat.parse_args(["--text", "hi", "--out", str(tmp_path / "reply.wav")]).out == str(tmp_path / "reply.wav")
