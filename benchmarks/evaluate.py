"""
The paper's evaluation in one command: does the Talker say what the Thinker wrote, and in whose voice?

    python benchmarks/evaluate.py --checkpoint models/minimind-3o --out out/eval
    python benchmarks/evaluate.py --checkpoint out/sft_zero_768.pth --limit 10 --unseen_voices none
    python benchmarks/evaluate.py --questions my_questions.jsonl     # {"text": ...} / {"audio": "q.wav"} rows

Every question (built-in English and Chinese ones, or a file's) is answered in text and speech as chat.py
does, in the model's own voice and in each voice of --voices and --unseen_voices. Consistency: the speech
transcribed (SenseVoiceSmall's CTC head) against the Thinker's text, both normalised, as CER (and WER for
English) by length bucket; voice: the cosine of CAM++ embeddings of the voice's reference clip and of the
speech made; speed: real-time factor and first audio. Writes DIR/report.md (the paper's tables, its numbers
beside ours for a released checkpoint), DIR/results.json and DIR/wavs/; a killed run, started again with
the same command, continues to the same samples. docs/evaluation.md has the details. The ASR and the
speaker model sit behind transcribe(wavs, sr, language) -> list[str] and embed_speaker(wav, sr) -> embedding:
pass others to evaluate() to swap them.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import statistics
import sys
import unicodedata
import zlib
from pathlib import Path

import common
import chat  # noqa: E402  (before torch: it sets the OpenMP environment)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import files  # noqa: E402
import minimind_o as mo  # noqa: E402

load_voices = files.load_voices   # the one place voices files are read

# The release's evaluation settings (its eval_omni.py) for the Thinker's text; speech sampling is the model's.
TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.7, 0.85, 512

# -----------------------------------------------------------------------------------------------
# The paper's numbers (the release README: Talker 768, CER by Qwen3-ASR, similarity by CAM++)
# -----------------------------------------------------------------------------------------------

PAPER_CONSISTENCY = {  # Avg CER and CER by length bucket, the Talker-width ablation's 768 rows
    "dense": {"all": 0.0897, "short": 0.1528, "mid": 0.0874, "long": 0.0675},
    "moe": {"all": 0.0900, "short": 0.2075, "mid": 0.0533, "long": 0.0271},
}
PAPER_ENGLISH = {  # minimind-3o (dense) on 20 English questions: (CER, WER, n) by length bucket
    "short": (0.0531, 0.0417, 8), "mid": (0.1327, 0.1420, 11), "long": (0.0431, 0.0508, 1)}
PAPER_SIMILARITY = {  # CAM++ cosine per voice: (dense, MoE); overall = the mean over the 12 voices
    ("seen", "dylan"): (0.6997, 0.6837), ("seen", "eric"): (0.5289, 0.4232), ("seen", "serena"): (0.7092, 0.7041),
    ("seen", "uncle_fu"): (0.7241, 0.7337), ("seen", "vivian"): (0.5744, 0.5888),
    ("unseen", "arthur"): (0.7171, 0.6750), ("unseen", "chelsie"): (0.6437, 0.6240),
    ("unseen", "cherry"): (0.5689, 0.5678), ("unseen", "ethan"): (0.4783, 0.4847),
    ("unseen", "jennifer"): (0.4749, 0.4003), ("unseen", "momo"): (0.6470, 0.5720),
    ("unseen", "moon"): (0.4282, 0.6673)}
PAPER_OVERALL_SIMILARITY = {"dense": 0.5995, "moe": 0.5937}
VARIANTS = ("dense", "moe")
RELEASED = files.RELEASE_FOLDERS + ("sft_omni_768.pth", "sft_omni_768_moe.pth")   # the paper measured these

# -----------------------------------------------------------------------------------------------
# The built-in questions: our own, on everyday topics, each asking for one short sentence
# -----------------------------------------------------------------------------------------------

BRIEF = {"en": " Answer briefly in one short sentence.", "zh": "请用一句话简短回答。"}
QUESTIONS = {
    "en": ["Why is the sky blue?", "What do plants need to grow?", "How does a rainbow form?",
           "What is the capital of France?", "Why do we need to sleep?", "What makes the ocean salty?",
           "How do bees make honey?", "What is a black hole?", "Why do leaves change colour in autumn?",
           "How can I drink more water every day?", "What is the difference between weather and climate?",
           "Why does ice float on water?", "What does a computer's memory do?", "Why do birds fly south in winter?",
           "What is a healthy breakfast?", "Why is exercise good for the brain?", "How far away is the moon?",
           "What is artificial intelligence?", "Why do cats purr?", "How do I make a good cup of tea?"],
    "zh": ["为什么天空是蓝色的？", "植物生长需要什么？", "彩虹是怎么形成的？", "中国的首都是哪里？", "人为什么要睡觉？",
           "海水为什么是咸的？", "蜜蜂是怎么酿蜜的？", "什么是黑洞？", "秋天的树叶为什么会变黄？", "怎样才能每天多喝水？",
           "天气和气候有什么区别？", "冰为什么会浮在水面上？", "冬天为什么会下雪？", "怎样提高学习效率？",
           "健康的早餐应该吃什么？", "运动对身体有什么好处？", "月亮为什么会有圆缺变化？", "什么是人工智能？",
           "猫为什么喜欢晒太阳？", "怎样泡一杯好茶？"],
}


def builtin_questions():
    """English and Chinese in turn (so --limit keeps both): [{'id', 'text', 'audio': None}]."""
    questions = []
    for i, pair in enumerate(zip(*QUESTIONS.values()), 1):
        questions += [{"id": f"{lang}-{i:02d}", "text": q + BRIEF[lang], "audio": None}
                      for lang, q in zip(QUESTIONS, pair)]
    return questions


QUESTION_ID = re.compile(r"[\w-]+")     # it names the sample's wav file


def read_questions(path):
    """A .txt file (one text question a line) or .jsonl (rows with "text" and/or "audio", a path relative to
    the file, and an optional "id") -> [{'id', 'text', 'audio'}]. A bad row names its file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file {path} not found")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"questions file {path}: expected .txt (a question a line) or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"questions file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = {"text": line.strip()} if path.suffix != ".jsonl" else json_row(path, n, line)
        audio = row.get("audio")
        if audio is not None and not (path.parent / audio).is_file():
            raise FileNotFoundError(f"{path} line {n}: audio file {path.parent / audio} not found")
        qid = str(row.get("id", f"q{n:03d}"))
        if not QUESTION_ID.fullmatch(qid):
            raise ValueError(f"{path} line {n}: id {qid!r} is not a plain name (letters, digits, _ and -)")
        questions.append({"id": qid, "text": row.get("text") or "",
                          "audio": str(path.parent / audio) if audio else None})
    ids = [q["id"] for q in questions]
    if not questions or len(set(ids)) < len(ids):
        raise ValueError(f"{path}: {'no questions' if not questions else 'the same id on two rows'}")
    return questions


def json_row(path, n, line):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from e
    if not isinstance(row, dict) or not (isinstance(row.get("text"), str) or isinstance(row.get("audio"), str)):
        raise ValueError(f'{path} line {n}: expected an object with "text" and/or "audio" (a file name)')
    return row


# -----------------------------------------------------------------------------------------------
# Text normalisation, length buckets, error rates
# -----------------------------------------------------------------------------------------------
# Both texts go through the same steps, so that only what was said differs: NFKC (full-width letters, digits
# and punctuation become half-width), lower case, numbers spelled out (num2words for English, cn2an for
# Chinese: an ASR writes what it hears, "twelve" / "十二", where the Thinker may have written "12"), then
# punctuation and symbols (ASCII and CJK, emoji too) become spaces; an apostrophe inside a word just goes.

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")          # 1,000 -> 1000
ENGLISH_NUMBER = re.compile(r"(\d+(?:\.\d+)?)(st|nd|rd|th|%)?")
APOSTROPHES = re.compile(r"(?<=\w)['\u2019](?=\w)")
ASR_TAGS = re.compile(r"<\|[^|]*\|>")                     # SenseVoice's <|en|><|NEUTRAL|><|Speech|><|woitn|>
ZH_CHARS_PER_WORD = 2            # a Chinese reply's length in words: its characters / 2 (the usual word length)
SHORT_MAX_WORDS, MID_MAX_WORDS = 15, 30                  # the paper's buckets: <=15, 16-30, 31-60 words
BUCKETS = ("short", "mid", "long")


def language_of(text):
    """'zh' when the text has any Chinese character, else 'en' (the paper's two languages)."""
    return "zh" if CJK.search(text) else "en"


def spell_english_number(match):
    from num2words import num2words
    number, suffix = match.group(1), match.group(2)
    value = float(number) if "." in number else int(number)
    if suffix == "%":
        return f" {num2words(value)} percent "
    return f" {num2words(value, to='ordinal' if suffix else 'cardinal')} "


def normalize(text, language):
    """Text -> the form both sides are compared in: English words joined by single spaces, Chinese
    characters (and any Latin words in them) without spaces."""
    text = THOUSANDS.sub("", unicodedata.normalize("NFKC", text).lower())
    if language == "zh":
        import cn2an
        text = cn2an.transform(text, "an2cn")
    else:
        text = ENGLISH_NUMBER.sub(spell_english_number, text)
    text = APOSTROPHES.sub("", text)
    text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return ("" if language == "zh" else " ").join(text.split())


def length_in_words(normalized, language):
    return len(normalized) / ZH_CHARS_PER_WORD if language == "zh" else len(normalized.split())


def bucket_of(words):
    return "short" if words <= SHORT_MAX_WORDS else "mid" if words <= MID_MAX_WORDS else "long"


def score(thinker_text, transcript):
    """What the Thinker wrote and what the ASR heard -> the sample's language, normalised texts, length
    bucket and error rates (jiwer; either can exceed 1: insertions). Without a text to compare with there is
    none; WER is English's only (Chinese has no spaces to count words by)."""
    import jiwer
    language = language_of(thinker_text)
    reference, hypothesis = normalize(thinker_text, language), normalize(transcript, language)
    return {"language": language, "reference": reference, "hypothesis": hypothesis,
            "bucket": bucket_of(length_in_words(reference, language)),
            "cer": jiwer.cer(reference, hypothesis) if reference else None,
            "wer": jiwer.wer(reference, hypothesis) if reference and language == "en" else None}


# -----------------------------------------------------------------------------------------------
# The ASR and the speaker model, each behind one small function
# -----------------------------------------------------------------------------------------------

SENSEVOICE_BPE = "chn_jpn_yue_eng_ko_spectok.bpe.model"   # the CTC head's tokenizer, in the published folder
ASR_FILES = files.SENSEVOICE_FILES + (SENSEVOICE_BPE,)
ASR_LANGUAGES = ("zh", "en")                               # SenseVoice also has yue/ja/ko; else "auto"
MIN_SPEAKER_SECONDS = 0.5        # a speaker embedding of less speech than this says little about the voice


def sensevoice_transcriber(folder, device="cpu"):
    """The whole SenseVoiceSmall (encoder + CTC head + tokenizer, funasr's own classes) from the published
    folder -> transcribe(wavs, sr, language) -> list of texts. Greedy CTC, no inverse text normalisation
    (numbers come out as words), no dither (a clip always gives the same transcript)."""
    import yaml
    folder = files.need_files(folder, ASR_FILES)
    with files.quiet_stdout():
        from funasr.frontends.wav_frontend import WavFrontend
        from funasr.models.sense_voice.model import SenseVoiceSmall
        from funasr.tokenizer.sentencepiece_tokenizer import SentencepiecesTokenizer
    config = yaml.safe_load((folder / "config.yaml").read_text())
    frontend_conf = {k: v for k, v in config.get("frontend_conf", {}).items() if k != "cmvn_file"}
    tokenizer = SentencepiecesTokenizer(bpemodel=str(folder / SENSEVOICE_BPE))
    frontend = WavFrontend(cmvn_file=str(folder / "am.mvn"), **frontend_conf, dither=0.0)
    model = SenseVoiceSmall(encoder=config["encoder"], encoder_conf=config["encoder_conf"],
                            input_size=frontend.output_size(), vocab_size=tokenizer.get_vocab_size(),
                            **config.get("model_conf", {}))
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model = model.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def transcribe(wavs, sr, language):
        wavs = [torch.from_numpy(mo.resample(np.asarray(w, np.float32), sr, mo.SAMPLE_RATE_SPEECH)) for w in wavs]
        results, _ = model.inference(wavs, key=[str(i) for i in range(len(wavs))], tokenizer=tokenizer,
                                     frontend=frontend, device=str(device), use_itn=False,
                                     language=language if language in ASR_LANGUAGES else "auto")
        return [ASR_TAGS.sub("", r["text"]).strip() for r in results]
    return transcribe


def campplus_embedder(campplus):
    """A loaded CAM++ (files.load_speaker_encoder) -> embed_speaker(wav, sr) -> (192,) embedding."""
    def embed_speaker(wav, sr):
        return mo.speaker_embedding(campplus, mo.resample(np.asarray(wav, np.float32), sr, mo.SAMPLE_RATE_SPEECH))
    return embed_speaker


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.float().view(1, -1), b.float().view(1, -1)).item()


# -----------------------------------------------------------------------------------------------
# The run: one sample = one question in one voice; finished samples are kept, one JSON line each
# -----------------------------------------------------------------------------------------------

DEFAULT_VOICE = "default"       # the model's own voice (no voice prompt): the consistency samples


def plan(questions, voice_sets):
    """Every sample, in order: each question in the model's own voice, then in each voice of each set.
    voice_sets: {split: {name: voice}} -> [{'key', 'split', 'voice', 'question'}]."""
    voices = [(None, DEFAULT_VOICE)] + [(split, name) for split, vs in voice_sets.items() for name in vs]
    samples = []
    for split, voice in voices:
        folder = voice if split is None else f"{split}-{voice}"
        samples += [{"key": f"{folder}/{q['id']}", "split": split, "voice": voice, "question": q} for q in questions]
    return samples


def sample_seed(seed, key):
    """The sample's own seed: the same whatever ran before it, so a resumed run matches a straight one."""
    return zlib.crc32(f"{seed}/{key}".encode())


class SampleLog:
    """DIR/samples.jsonl: one finished sample per line, flushed to disk as it is written. A line cut short
    by a kill is dropped when the log is opened again (its sample runs again)."""

    def __init__(self, path):
        self.path, self.rows = Path(path), {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            whole = [line for line in lines if line.endswith("\n")]
            self.rows = {row["key"]: row for row in (self.parse(n, line) for n, line in enumerate(whole, 1))}
            if len(whole) < len(lines):
                with files.atomic_path(self.path) as tmp:
                    Path(tmp).write_text("".join(whole), encoding="utf-8")

    def parse(self, n, line):
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path} line {n} is not a sample ({e.msg}): delete that line to run it again") from e

    def add(self, row):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row


def run_sample(bot, sample, voice, seed, out, transcribe, embed_speaker, reference_embedding):
    """Ask one question in one voice; transcribe and embed the speech; keep the wav. -> the sample's row."""
    q = sample["question"]
    bot.reset()
    bot.voice = voice
    torch.manual_seed(sample_seed(seed, sample["key"]))
    reply = bot.ask(q["text"], q["audio"])
    wav_path = Path(out) / "wavs" / f"{sample['key']}.wav"
    chat.write_wav(wav_path, reply.pcm)
    speech_s = len(reply.pcm) / mo.SAMPLE_RATE_MIMI
    transcript = transcribe([reply.pcm], mo.SAMPLE_RATE_MIMI, language_of(reply.text))[0] if speech_s else ""
    similarity = None
    if reference_embedding is not None and speech_s >= MIN_SPEAKER_SECONDS:
        similarity = cosine(reference_embedding, embed_speaker(reply.pcm, mo.SAMPLE_RATE_MIMI))
    return {"key": sample["key"], "question_id": q["id"], "question": q["text"], "audio": q["audio"],
            "split": sample["split"], "voice": sample["voice"], "text": reply.text, "transcript": transcript,
            **score(reply.text, transcript), "similarity": similarity, "speech_s": speech_s,
            "steps": reply.steps, "seconds": reply.seconds, "rtf": reply.seconds / speech_s if speech_s else None,
            "first_audio_s": reply.first_audio_s, "wav": str(wav_path.relative_to(out))}


def reference_embedding(bot, split, name, voice, embed_speaker, out):
    """The embedding of a voice's reference clip: its ref_codes decoded by Mimi (the codec the generated
    speech comes through too), kept as DIR/wavs/references/SPLIT-NAME.wav to listen to."""
    pcm = mo.decode_audio_codes(bot.part("mimi"), voice["ref_codes"])
    chat.write_wav(Path(out) / "wavs" / "references" / f"{split}-{name}.wav", pcm)
    return embed_speaker(pcm, mo.SAMPLE_RATE_MIMI)


def evaluate(bot, questions, voice_sets, out, seed, transcribe, embed_speaker):
    """Run (or continue) every sample not yet in DIR/samples.jsonl -> all rows, in plan order. The samples
    already there must come from the same settings (main checks that with check_settings)."""
    from tqdm import tqdm
    out = Path(out)
    log = SampleLog(out / "samples.jsonl")
    samples = plan(questions, voice_sets)
    todo = [s for s in samples if s["key"] not in log.rows]
    # Load the side modules before the first sample: building one draws random numbers (its initial weights),
    # which inside a sample would shift the sample's random stream, differently in a resumed run.
    bot.part("mimi")
    if any(q["audio"] for q in questions):
        bot.part("sensevoice")
    references = {}   # (split, name) -> embedding, for the voices that still have samples to run
    for sample in tqdm(todo, desc="evaluate", unit="sample", initial=len(samples) - len(todo), total=len(samples)):
        split, name = sample["split"], sample["voice"]
        voice = voice_sets[split][name] if split else None
        if voice is not None and (split, name) not in references:
            references[split, name] = reference_embedding(bot, split, name, voice, embed_speaker, out)
        log.add(run_sample(bot, sample, voice, seed, out, transcribe, embed_speaker, references.get((split, name))))
    return [log.rows[s["key"]] for s in samples]


def check_settings(out, settings):
    """A run continues only with the settings it started with (DIR/run.json); else a clear refusal."""
    path = Path(out) / "run.json"
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; it names the folder the run's files go in")
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)} differ): "
                             "use another --out, or delete it to start afresh")
    else:  # written before any sample is made: a folder that cannot be written is said at once
        try:
            with files.atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(settings, indent=2, ensure_ascii=False))
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write {path} ({e.strerror or e})") from None


# -----------------------------------------------------------------------------------------------
# Summary and report
# -----------------------------------------------------------------------------------------------

def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rates(rows):
    scored = [r for r in rows if r["cer"] is not None]
    return {"n": len(scored), "cer": mean(r["cer"] for r in scored), "wer": mean(r["wer"] for r in scored)}


def by_bucket(rows):
    return {"all": rates(rows), **{b: rates([r for r in rows if r["bucket"] == b]) for b in BUCKETS}}


def summarize(rows):
    """Means over samples (CER, WER; a sample without text is left out), by bucket and language for the
    model's own voice; per voice, and over voices (the paper's overall: the mean of the voices' means)."""
    own = [r for r in rows if r["split"] is None]
    consistency = by_bucket(own)
    by_language = {lang: by_bucket([r for r in own if r["language"] == lang]) for lang in ("zh", "en")}
    voices = {}
    for r in rows:
        if r["split"] is not None:
            voices.setdefault(f"{r['split']}/{r['voice']}", []).append(r)
    per_voice = {k: {"split": v[0]["split"], "voice": v[0]["voice"], "similarity": mean(r["similarity"] for r in v),
                     **rates(v)} for k, v in voices.items()}
    overall = {split: mean(v["similarity"] for v in per_voice.values() if split in ("all", v["split"]))
               for split in ("all", "seen", "unseen")}
    spoken = [r for r in rows if r["rtf"] is not None]
    rtf, first_audio = [r["rtf"] for r in spoken], [r["first_audio_s"] for r in spoken]
    median = lambda values: statistics.median(values) if values else None
    speed = {"n": len(spoken), "speech_s": sum(r["speech_s"] for r in spoken), "rtf_mean": mean(rtf),
             "rtf_median": median(rtf), "first_audio_median_s": median(first_audio),
             "first_audio_max_s": max(first_audio, default=None)}
    return {"consistency": consistency, "by_language": by_language, "voices": per_voice,
            "similarity": overall, "speed": speed, "samples": len(rows)}


def f4(x):
    return "—" if x is None else f"{x:.4f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def consistency_table(summary, variant):
    c = summary["consistency"]
    rows = [["this run", c["all"]["n"], f4(c["all"]["cer"]), f"{f4(c['short']['cer'])} (n={c['short']['n']})",
             f"{f4(c['mid']['cer'])} / {f4(c['long']['cer'])} (n={c['mid']['n']} / {c['long']['n']})"]]
    if variant:
        p = PAPER_CONSISTENCY[variant]
        rows.append([f"paper, {variant} 768", "", p["all"], p["short"], f"{p['mid']} / {p['long']}"])
    return table(["", "samples", "Avg CER ↓", "Short ↓", "Mid / Long ↓"], rows)


def language_table(summary, variant):
    zh, en = summary["by_language"]["zh"], summary["by_language"]["en"]
    paper = variant == "dense"          # the paper's English table is of the dense model
    header = ["Length bucket", "Chinese CER", "English CER / WER"] + (["paper, English CER / WER"] if paper else [])
    rows = []
    for b, label in zip(BUCKETS + ("all",), ("short (≤15w)", "mid (16–30w)", "long (>30w)", "all")):
        row = [label, f"{f4(zh[b]['cer'])} (n={zh[b]['n']})",
               f"{f4(en[b]['cer'])} / {f4(en[b]['wer'])} (n={en[b]['n']})"]
        if paper:
            row.append("" if b == "all" else "{} / {} (n={})".format(*PAPER_ENGLISH[b]))
        rows.append(row)
    return table(header, rows)


def voice_table(summary, variant):
    paper_col = VARIANTS.index(variant) if variant else None
    paper_header = [f"paper, {variant} ↑"] if variant else []
    header = ["Split", "Speaker", "similarity ↑"] + paper_header + ["CER ↓", "samples"]
    rows = []
    for v in summary["voices"].values():
        paper = PAPER_SIMILARITY.get((v["split"], v["voice"]))
        rows.append([v["split"], v["voice"], f4(v["similarity"])]
                    + ([f4(paper[paper_col] if paper else None)] if variant else []) + [f4(v["cer"]), v["n"]])
    s = summary["similarity"]
    for split in ("seen", "unseen", "all"):
        label = "**overall**" if split == "all" else f"{split}, mean"
        paper = PAPER_OVERALL_SIMILARITY[variant] if variant and split == "all" else None
        rows.append(["", label, f4(s[split])] + ([f4(paper)] if variant else []) + ["", ""])
    return table(header, rows)


def speed_table(summary):
    s = summary["speed"]
    return table(["replies", "speech (s)", "RTF mean", "RTF median", "first audio median (s)", "first audio max (s)"],
                 [[s["n"], f"{s['speech_s']:.1f}", f4(s["rtf_mean"]), f4(s["rtf_median"]),
                   f4(s["first_audio_median_s"]), f4(s["first_audio_max_s"])]])


def report(summary, settings, variant):
    paper = (f"The paper's numbers for the released {variant} model stand beside ours; it transcribed with "
             "Qwen3-ASR and we with SenseVoiceSmall, so compare trends rather than digits."
             if variant else "Not a released checkpoint: the paper's numbers are in docs/evaluation.md to compare with.")
    return "\n\n".join([
        f"# MiniMind-O evaluation: {settings['checkpoint']}",
        f"{summary['samples']} samples, seed {settings['seed']}, temperature {settings['temperature']}, top_p "
        f"{settings['top_p']}, max_new_tokens {settings['max_new_tokens']}, {settings['device']} {settings['dtype']}. "
        + paper,
        "## Thinker–Talker consistency (model's own voice)",
        "CER between what the Thinker wrote and the ASR transcript of the Talker's speech, both normalised; "
        "the mean over samples. Buckets by the length of the Thinker's text (a Chinese word = 2 characters).",
        consistency_table(summary, variant), language_table(summary, variant),
        "## Voice-cloning similarity",
        "Cosine of CAM++ embeddings: the voice's reference clip vs the speech made, mean over the voice's "
        "samples; overall = the mean over voices.",
        voice_table(summary, variant) if summary["voices"] else "(no voices evaluated)",
        "## Speed",
        "RTF = wall time of a reply (model and Mimi) / seconds of speech; first audio = from the question to "
        "the first decoded sound.",
        speed_table(summary), ""])


# -----------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------

UNSEEN_VOICES_URL = f"{files.RELEASE_URL}speaker/voices_unseen.pt"
PARTS = {  # files.PARTS, for what the evaluation needs each for, and the unseen voices
    **files.PARTS,
    "sensevoice": dataclasses.replace(
        files.PARTS["sensevoice"], name="ASR and speech encoder (SenseVoiceSmall with its CTC head and tokenizer)",
        needed_for="transcribing the speech", files=ASR_FILES),
    "campplus": dataclasses.replace(files.PARTS["campplus"], needed_for="voice similarity"),
    "voices": dataclasses.replace(files.PARTS["voices"], needed_for="voice similarity, seen voices"),
    "unseen_voices": files.Part("unseen voices", "voice similarity, unseen voices", "models/voices_unseen.pt",
                                (f"curl -L -o models/voices_unseen.pt {UNSEEN_VOICES_URL}",), url=UNSEEN_VOICES_URL),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    models = files.MODELS
    p.add_argument("--checkpoint", default=chat.default_checkpoint(models / "minimind-3o", models / "sft_omni_768.pth"),
                   help="released folder or .pth, or a train.py checkpoint (default as chat.py)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default as chat.py)")
    p.add_argument("--mimi", default=PARTS["mimi"].default, help=f"folder with {files.MIMI_WEIGHTS}, or the file")
    p.add_argument("--sensevoice", default=PARTS["sensevoice"].default,
                   help=f"SenseVoiceSmall folder: the ASR ({', '.join(ASR_FILES)})")
    p.add_argument("--campplus", default=PARTS["campplus"].default, help=f"folder with {files.CAMPP_WEIGHTS}")
    p.add_argument("--voices", default=PARTS["voices"].default, help="seen voices (default models/voices.pt; "
                   "'none' skips them)")
    p.add_argument("--unseen_voices", default=PARTS["unseen_voices"].default,
                   help="unseen voices (default models/voices_unseen.pt; 'none' skips them)")
    p.add_argument("--questions", metavar="FILE", help=".txt (a question a line) or .jsonl ({'text': ...} and/or "
                   "{'audio': FILE}); default: the built-in 20 English + 20 Chinese")
    p.add_argument("--out", default=str(common.ROOT / "out" / "eval"), help="output folder (default out/eval); an "
                   "unfinished run there is continued")
    p.add_argument("--limit", type=files.positive, help="only the first N questions (each in every voice)")
    p.add_argument("--seed", type=files.random_seed, default=0, help="seed of every sample's own seed (default 0)")
    p.add_argument("--max_new_tokens", type=files.positive, default=MAX_NEW_TOKENS, help=f"default {MAX_NEW_TOKENS}")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help=f"default {TEMPERATURE}, the release's")
    p.add_argument("--top_p", type=float, default=TOP_P, help=f"default {TOP_P}, the release's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=chat.cpu_threads, help="CPU threads for PyTorch")
    p.add_argument("--download", action="store_true", help="first fetch the missing parts (online)")
    return p.parse_args(argv)


def chat_args(args):
    """The same settings as chat.py's options: the evaluation talks through chat.Chat."""
    flags = ["--checkpoint", args.checkpoint, "--mimi", args.mimi, "--sensevoice", args.sensevoice,
             "--campplus", args.campplus, "--max_new_tokens", str(args.max_new_tokens), "--temperature",
             str(args.temperature), "--top_p", str(args.top_p), "--device", args.device, "--dtype", args.dtype,
             "--mute"]
    return chat.parse_args(flags + (["--tokenizer", args.tokenizer] if args.tokenizer else []))


def parts_needed(args):
    voice_files = [k for k in ("voices", "unseen_voices") if getattr(args, k) != "none"]
    return ["checkpoint", "tokenizer", "mimi", "sensevoice"] + (["campplus"] if voice_files else []) + voice_files


def settings_of(args, questions, voice_sets):
    """What the samples depend on (a run continues only with the same); --limit and --out are not in it."""
    listing = json.dumps(questions, ensure_ascii=False, sort_keys=True).encode()
    return {"checkpoint": str(args.checkpoint), "seed": args.seed, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "device": args.device, "dtype": args.dtype,
            "questions": hashlib.sha256(listing).hexdigest()[:16],
            "voices": {split: sorted(vs) for split, vs in voice_sets.items()}}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cargs = chat_args(args)
    args.tokenizer = cargs.tokenizer
    keys = parts_needed(args)
    if args.download and (failures := files.download(args, keys, PARTS)):
        sys.exit("download failed:\n  " + "\n  ".join(failures))
    missing = files.missing_report(args, keys, PARTS)
    if missing:
        sys.exit(f"evaluate.py: {missing}")
    try:
        every_question = read_questions(args.questions) if args.questions else builtin_questions()
        questions = every_question[:args.limit]
        voice_sets = {split: load_voices(getattr(args, key)) for split, key in (("seen", "voices"),
                      ("unseen", "unseen_voices")) if getattr(args, key) != "none"}
        settings = settings_of(args, every_question, voice_sets)   # so a run may go on with a larger --limit
        check_settings(args.out, settings)
        bot = chat.Chat(cargs)
        with files.loading("sensevoice", args.sensevoice):
            transcribe = sensevoice_transcriber(args.sensevoice, bot.device)
        embed_speaker = campplus_embedder(bot.part("campplus")) if voice_sets else None
        rows = evaluate(bot, questions, voice_sets, args.out, args.seed, transcribe, embed_speaker)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate.py: {e}")
    except KeyboardInterrupt:
        sys.exit(f"\nstopped; the finished samples are kept in {args.out}: the same command continues")
    summary = summarize(rows)
    released = Path(args.checkpoint).name in RELEASED
    variant = ("moe" if bot.model.config.use_moe else "dense") if released else None
    out = Path(args.out)
    with files.atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({"settings": settings, "summary": summary, "samples": rows}, indent=1,
                                        ensure_ascii=False))
    with files.atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(report(summary, settings, variant), encoding="utf-8")
    print(f"{len(rows)} samples: {out / 'report.md'}, {out / 'results.json'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
