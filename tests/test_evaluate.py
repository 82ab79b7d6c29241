"""benchmarks/evaluate.py: text normalisation and error rates on pairs with known answers, the metric pipeline
with a real ASR (pocketsphinx's English model, shipped in its PyPI package) on espeak-ng speech, and the whole
command on the demo checkpoint with random-weight side modules: report, JSON, wavs, and a killed run that
continues to the same samples as a straight one."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import chat
import minimind_o as mo
import files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import evaluate as ev  # noqa: E402

side_assets = pytest.importorskip("side_assets", reason="tests/side_assets.py builds the side modules")

REPLY_STEPS = 16                  # 8 frames (0.64 s) of speech per reply: enough for a speaker embedding
REF_FRAMES = 12


# -- normalisation, buckets, error rates -------------------------------------------------------------

@pytest.mark.parametrize("text, language, expected", [
    ("Hello, World!", "en", "hello world"),
    ("ＨＥＬＬＯ　ｗｏｒｌｄ！", "en", "hello world"),                    # full width -> half width
    ("It's 12 o'clock; I have 2 cats.", "en", "its twelve oclock i have two cats"),
    ("The 1st of 1,000 runners: 50% faster, 3.5 km.", "en",
     "the first of one thousand runners fifty percent faster three point five km"),
    ("twenty-four “quoted” words — a dash", "en", "twenty four quoted words a dash"),
    ("你好，世界！", "zh", "你好世界"),                                  # CJK punctuation
    ("今天是2024年，我有3个苹果。", "zh", "今天是二零二四年我有三个苹果"),
    ("AI 是一种技术😊", "zh", "ai是一种技术"),                           # emoji is a symbol; spaces go
])
def test_normalize(text, language, expected):
    assert ev.normalize(text, language) == expected


@pytest.mark.parametrize("thinker, heard, cer, wer", [
    ("The cat sat on the mat.", "the cat sat on the mat", 0.0, 0.0),
    ("The cat sat on the mat.", "the cat sat on mat", 4 / 22, 1 / 6),    # "the " deleted: 4 of 22 characters
    ("Hello world!", "hello word", 1 / 11, 1 / 2),
    ("I have 2 cats.", "I have two cats", 0.0, 0.0),                    # digits and words agree
    ("Hello world!", "", 1.0, 1.0),                                     # no speech: everything deleted
    ("今天天气很好。", "今天天气好", 1 / 6, None),                          # Chinese: CER over characters only
    ("今天是2024年", "今天是二零二四年", 0.0, None),
])
def test_error_rates_on_pairs_with_known_answers(thinker, heard, cer, wer):
    scored = ev.score(thinker, heard)
    assert scored["cer"] == pytest.approx(cer)
    assert scored["wer"] == (None if wer is None else pytest.approx(wer))
    assert scored["language"] == ("en" if wer is not None else "zh")


def test_no_thinker_text_has_no_error_rate_and_buckets_follow_the_paper():
    assert ev.score("", "something")["cer"] is None
    assert [ev.bucket_of(n) for n in (1, 15, 16, 30, 31, 60, 200)] == ["short"] * 2 + ["mid"] * 2 + ["long"] * 3
    assert ev.length_in_words("字" * 30, "zh") == 15 and ev.length_in_words("a b c", "en") == 3


def test_builtin_questions_alternate_languages_and_ask_for_one_short_sentence():
    questions = ev.builtin_questions()
    assert len(questions) == 40 and len({q["id"] for q in questions}) == 40
    assert [ev.language_of(q["text"]) for q in questions[:4]] == ["en", "zh", "en", "zh"]   # --limit keeps both
    assert all(q["text"].endswith(ev.BRIEF[ev.language_of(q["text"])]) for q in questions)


def test_the_papers_overall_similarity_is_the_mean_of_its_voices():
    for column, variant in enumerate(ev.VARIANTS):
        per_voice = [v[column] for v in ev.PAPER_SIMILARITY.values()]
        assert len(per_voice) == 12 and round(np.mean(per_voice), 4) == ev.PAPER_OVERALL_SIMILARITY[variant]


# -- a real ASR through the metric pipeline ---------------------------------------------------------

KNOWN_SENTENCES = ["The weather is nice today.", "Please open the window!", "I would like a cup of coffee.",
                   "We have 2 cats and a dog."]
ESPEAK_CLEAR = ("en-us+f2", "140")   # the espeak-ng voice and rate pocketsphinx hears best


def pocketsphinx_transcriber():
    """pocketsphinx's English model as a transcribe(wavs, sr, language) -> list[str], evaluate's ASR slot."""
    pocketsphinx = pytest.importorskip("pocketsphinx", reason="pip install -r requirements.txt brings pocketsphinx")
    decoder = pocketsphinx.Decoder(samprate=mo.SAMPLE_RATE_SPEECH, loglevel="FATAL")

    def transcribe(wavs, sr, language):
        texts = []
        for wav in wavs:
            pcm = (np.clip(mo.resample(wav, sr, mo.SAMPLE_RATE_SPEECH), -1, 1) * 32767).astype(np.int16)
            decoder.start_utt()
            decoder.process_raw(pcm.tobytes(), full_utt=True)
            decoder.end_utt()
            texts.append(decoder.hyp().hypstr if decoder.hyp() else "")
        return texts
    return transcribe


def espeak(text):
    voice, rate = ESPEAK_CLEAR
    command = ["espeak-ng", "-v", voice, "-s", rate, "--stdout", text]
    raw = subprocess.run(command, check=True, capture_output=True).stdout
    return files.load_audio(raw, mo.SAMPLE_RATE_SPEECH)


def scrambled(wav, chunk_s=0.1):
    """The same sound in 100 ms chunks, shuffled: every sound is there, no word is."""
    chunk = int(chunk_s * mo.SAMPLE_RATE_SPEECH)
    chunks = [wav[i:i + chunk] for i in range(0, len(wav), chunk)]
    np.random.default_rng(0).shuffle(chunks)
    return np.concatenate(chunks)


def test_real_asr_gives_low_cer_on_clear_speech_and_high_cer_on_scrambled_speech():
    transcribe = pocketsphinx_transcriber()
    wavs = [espeak(s) for s in KNOWN_SENTENCES]
    clear = transcribe(wavs, mo.SAMPLE_RATE_SPEECH, "en")
    mixed = transcribe([scrambled(w) for w in wavs], mo.SAMPLE_RATE_SPEECH, "en")
    clear_cer = np.mean([ev.score(s, t)["cer"] for s, t in zip(KNOWN_SENTENCES, clear)])
    mixed_cer = np.mean([ev.score(s, t)["cer"] for s, t in zip(KNOWN_SENTENCES, mixed)])
    print(f"pocketsphinx CER: clear {clear_cer:.3f} {clear}, scrambled {mixed_cer:.3f} {mixed}")
    assert clear_cer < 0.2 < 0.6 < mixed_cer


# -- questions file, settings, the sample log -------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("q.jsonl", '{"text": "hi"}\n{"txt": "typo"}\n', "q.jsonl line 2: expected an object"),
    ("q.jsonl", '{"text": "hi"}\nnot json\n', "q.jsonl line 2: not JSON"),
    ("q.jsonl", '{"audio": "missing.wav"}\n', "q.jsonl line 1: audio file .*missing.wav not found"),
    ("q.jsonl", '{"id": "../up", "text": "hi"}\n', "line 1: id '../up' is not a plain name"),
    ("q.txt", "one\n\none\n", None),
    ("q.csv", "a,b\n", "expected .txt"),
])
def test_questions_files_and_their_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    if message is None:
        assert [q["id"] for q in ev.read_questions(path)] == ["q001", "q003"]   # ids from line numbers
        return
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ev.read_questions(path)


def test_a_run_continues_only_with_its_own_settings(tmp_path):
    ev.check_settings(tmp_path, {"seed": 0, "checkpoint": "a.pth"})
    ev.check_settings(tmp_path, {"seed": 0, "checkpoint": "a.pth"})           # the same: continues
    with pytest.raises(ValueError, match="other settings \\(seed differ\\)"):
        ev.check_settings(tmp_path, {"seed": 1, "checkpoint": "a.pth"})


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    log = ev.SampleLog(tmp_path / "samples.jsonl")
    log.add({"key": "default/a", "cer": 0.5})
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"key": "default/b", "ce')                                      # killed mid-write
    again = ev.SampleLog(tmp_path / "samples.jsonl")
    assert list(again.rows) == ["default/a"] and log.path.read_text().endswith("}\n")
    again.add({"key": "default/b", "cer": 0.1})
    assert list(ev.SampleLog(log.path).rows) == ["default/a", "default/b"]
    log.path.write_text(log.path.read_text().replace('"cer": 0.1', '"cer": 0.1,,'))     # edited by hand
    with pytest.raises(ValueError, match="samples.jsonl line 2 is not a sample"):
        ev.SampleLog(log.path)


def rows_for_report():
    row = dict(split=None, voice="default", language="en", bucket="short", cer=0.1, wer=0.2, similarity=None,
               rtf=0.5, speech_s=2.0, first_audio_s=0.3)
    return [row, dict(row, language="zh", bucket="mid", cer=0.3, wer=None),
            dict(row, split="seen", voice="dylan", cer=0.2, similarity=0.6),
            dict(row, split="unseen", voice="moon", cer=0.4, similarity=0.4)]


def test_summary_means_and_the_papers_numbers_beside_ours_for_a_released_model():
    summary = ev.summarize(rows_for_report())
    assert summary["consistency"]["all"] == {"n": 2, "cer": pytest.approx(0.2), "wer": pytest.approx(0.2)}
    assert summary["by_language"]["zh"]["mid"]["n"] == 1 and summary["similarity"]["all"] == pytest.approx(0.5)
    settings = dict(checkpoint="models/minimind-3o", seed=0, temperature=0.7, top_p=0.85, max_new_tokens=512,
                    device="cpu", dtype="float32")
    dense = ev.report(summary, settings, "dense")
    assert "| paper, dense 768 |  | 0.0897 | 0.1528 | 0.0874 / 0.0675 |" in dense
    assert "| seen | dylan | 0.6000 | 0.6997 | 0.2000 | 1 |" in dense and "0.5995" in dense
    assert "0.0531 / 0.0417 (n=8)" in dense                                     # the paper's English table
    assert "0.5937" in ev.report(summary, settings, "moe")
    own = ev.report(summary, settings, None)
    assert "0.0897" not in own and "| this run | 2 | 0.2000 |" in own


# -- the whole command on the demo checkpoint --------------------------------------------------------

@pytest.fixture(scope="module")
def eval_flags(tmp_path_factory, parts, demo_checkpoint, tokenizer_flag):
    """Flags for a small run: a text and a spoken question, one seen and one unseen voice (random codes)."""
    root = tmp_path_factory.mktemp("eval_inputs")
    (root / "questions.jsonl").write_text(
        json.dumps({"id": "spoken", "audio": str(side_assets.QUESTION_WAV)}) + "\n"
        + json.dumps({"id": "sum", "text": "1+1="}) + "\n", encoding="utf-8")
    codes = torch.Generator().manual_seed(0)
    for file, name in (("seen.pt", "dylan"), ("unseen.pt", "moon")):
        files.save_voice(root / file, name, {"ref_codes": torch.randint(0, mo.CODEBOOK_SIZE, (mo.N_CODEBOOKS, REF_FRAMES),
                                                                     generator=codes),
                                          "spk_emb": torch.zeros(mo.SPK_EMBED_DIM)})
    return ["--checkpoint", str(demo_checkpoint), *tokenizer_flag, "--mimi", str(parts["mimi"]),
            "--sensevoice", str(parts["sensevoice"]), "--campplus", str(parts["campplus"]),
            "--voices", str(root / "seen.pt"), "--unseen_voices", str(root / "unseen.pt"),
            "--questions", str(root / "questions.jsonl"), "--max_new_tokens", str(REPLY_STEPS), "--seed", "3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, eval_flags):
    out = tmp_path_factory.mktemp("eval_straight")
    summary = ev.main(eval_flags + ["--out", str(out)])
    return out, summary


def test_the_command_writes_the_report_the_json_and_the_wavs(straight_run):
    out, summary = straight_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    keys = [r["key"] for r in results["samples"]]
    assert keys == ["default/spoken", "default/sum", "seen-dylan/spoken", "seen-dylan/sum",
                    "unseen-moon/spoken", "unseen-moon/sum"]
    for row in results["samples"]:
        assert (out / row["wav"]).is_file() and row["speech_s"] == pytest.approx((REPLY_STEPS - mo.N_CODEBOOKS) * 0.08)
        assert isinstance(row["transcript"], str) and row["cer"] is not None and row["rtf"] > 0
        assert (row["similarity"] is None) == (row["split"] is None)
        assert -1 <= (row["similarity"] or 0) <= 1 and row["first_audio_s"] > 0
    assert summary["consistency"]["all"]["n"] == 2 and set(summary["voices"]) == {"seen/dylan", "unseen/moon"}
    assert (out / "wavs" / "references" / "seen-dylan.wav").is_file()
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Thinker–Talker consistency", "## Voice-cloning similarity", "## Speed"):
        assert heading in report
    assert "| seen | dylan |" in report and "| unseen | moon |" in report and "paper, dense" not in report


def test_a_killed_run_continues_to_the_same_samples_as_a_straight_run(tmp_path, eval_flags, straight_run, monkeypatch):
    """Started with --limit 1 and killed before its second sample, then a line cut short; the run started
    again without --limit must end with the straight run's samples, wav for wav."""
    out, flags = tmp_path / "eval", eval_flags + ["--out", str(tmp_path / "eval")]
    real_run_sample, calls = ev.run_sample, []

    def killed_at_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_sample(*args)

    monkeypatch.setattr(ev, "run_sample", killed_at_the_second)
    with pytest.raises(SystemExit, match="the same command continues"):
        ev.main(flags + ["--limit", "1"])
    monkeypatch.setattr(ev, "run_sample", real_run_sample)
    with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write('{"key": "seen-dylan/spoken", "text": "half a li')      # and a kill in the middle of a line
    assert list(ev.SampleLog(out / "samples.jsonl").rows) == ["default/spoken"]
    ev.main(flags)
    resumed = json.loads((out / "results.json").read_text(encoding="utf-8"))["samples"]
    straight = json.loads((straight_run[0] / "results.json").read_text(encoding="utf-8"))["samples"]
    timing = ("seconds", "rtf", "first_audio_s")
    without_timing = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert without_timing(resumed) == without_timing(straight)
    for row in resumed:
        assert (out / row["wav"]).read_bytes() == (straight_run[0] / row["wav"]).read_bytes()
    with pytest.raises(SystemExit, match="other settings \\(seed differ\\)"):
        ev.main(flags + ["--seed", "4"])


def test_missing_parts_are_listed_with_where_they_go(tmp_path, parts, demo_checkpoint, tokenizer_flag):
    encoder_only = tmp_path / "SenseVoiceSmall"          # what chat.py needs, without the ASR's tokenizer
    encoder_only.mkdir()
    for name in files.SENSEVOICE_FILES:
        (encoder_only / name).write_bytes((parts["sensevoice"] / name).read_bytes())
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", str(demo_checkpoint), *tokenizer_flag, "--mimi", str(parts["mimi"]),
                 "--sensevoice", str(encoder_only), "--campplus", str(tmp_path / "campplus"),
                 "--voices", str(tmp_path / "voices.pt"), "--unseen_voices", str(tmp_path / "voices_unseen.pt")])
    message = str(e.value)
    for what in ("ASR and speech encoder", "--sensevoice", "FunAudioLLM/SenseVoiceSmall", "speaker encoder (CAM++)",
                 "--campplus", "voices_unseen.pt", "--unseen_voices", "--download"):
        assert what in message
    assert "MiniMind-O weights" not in message and "Mimi" not in message


def test_a_questions_file_that_is_not_utf8_or_an_out_that_cannot_hold_the_run_is_named(tmp_path, monkeypatch):
    questions = tmp_path / "questions.txt"
    questions.write_bytes("Wie spät ist es?\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"questions file .*questions.txt is not UTF-8 text \(invalid .* at byte 6\)"):
        ev.read_questions(questions)
    with pytest.raises(ValueError, match="--out .*questions.txt is a file; it names the folder"):
        ev.check_settings(questions, {"seed": 0})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(ValueError, match=r"--out .*out: cannot write .*run.json \(No space left on device\)"):
        ev.check_settings(tmp_path / "out", {"seed": 0})
