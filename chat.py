"""
Talk with MiniMind-O: type, speak or show it a picture; it answers in text and in streaming speech.

The model makes one column per step: a text token and one 80 ms frame of 8 Mimi codes (section 11 of
minimind_o.py). Here the frames go to a background thread that decodes them with Mimi in streaming mode,
so the first sound plays while the text is still being written and Mimi works while the model computes
its next steps. With --mic, Silero VAD cuts the microphone into questions, and speaking during a reply
stops it (barge-in); the new question is heard from its first word. With --web, the same chat is a web
page: web.py, imported only then.

Parts, in order (files.py finds, fetches and loads the published parts): speech out (`SpeechOut`: Mimi
frame by frame, `Player`); speech in (`MicStream`, Silero VAD's `VoiceActivity`, `Listener`); a conversation
(`TextStream`, the prompt's escaping, `Chat`); the terminal chat (`converse` for --mic, `interactive`,
`one_shot`); the command line (`parse_args`, `main`).
"""
import argparse
import collections
import copy
import itertools
import os
import queue
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Mimi decodes in a second thread while the model computes. OpenMP threads that wait for work by spinning
# (the default: forever) take the cores from that thread; sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes
# every small op of a decoding step wait to wake its threads (measured: 40 -> 26 steps/s on 2 cores). A
# short spin, then sleep, keeps both fast. GNU OpenMP, which PyTorch's Linux wheels use; set before torch.
OPENMP_SPIN_COUNT = "30000"
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import minimind_o as mo  # the model (sections 1-11) and the frozen side modules' adapters (section 12)
import files     # the published parts (where each comes from, how to get it), and the user's audio and images

LEAD_IN_CHUNKS = 10        # 320 ms of audio kept before the VAD says "speech": it fires a little late
PLAYBACK_POLL_S = 0.02     # how often --mic listens for barge-in while the last of a reply plays
SPEECH_FRAME_S = 0.06     # one SenseVoice output frame (a prompt token) per 6 fbank frames of 10 ms
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aiff")


# -----------------------------------------------------------------------------------------------
# Speech out: Mimi decoding frame by frame, in a background thread, to the sound card
# -----------------------------------------------------------------------------------------------

class SpeechOut:
    """One reply's speech: Mimi frames in (put), 24 kHz PCM out as they come, to the player and into `pcm` (its
    chunks, in order); close() returns all of it.

    Mimi's decoder is causal, so decoding chunk by chunk under moshi's streaming state gives the same samples
    as decoding the whole sequence. The first chunk is `first_call_frames` frames (1: the earliest first sound),
    then `frames_per_call` at a time (1 = least latency, 4 = least overhead per frame). Until close() the whole
    Mimi model is in streaming mode: do not call encode on it.

    On the CPU, Mimi decodes in a background thread, so decoding overlaps the model's next steps. On a
    GPU both only launch kernels, and a second Python thread would just wait for the GIL: there Mimi
    decodes in the caller's thread (background=None picks; True/False forces it, for the benchmark)."""

    def __init__(self, mimi, frames_per_call=2, player=None, background=None, first_call_frames=1):
        if frames_per_call < 1 or first_call_frames < 1:
            raise ValueError(f"frames per decode call must be >= 1, got {frames_per_call} (first {first_call_frames})")
        self.mimi, self.frames_per_call, self.first_call_frames = mimi, frames_per_call, first_call_frames
        self.player, self.pending, self.pcm, self.first_audio, self.error = player, [], [], None, None
        if background is None:
            background = next(mimi.parameters()).device.type == "cpu"
        # Mimi's streaming state lives from here to close(), across threads: hence no `with` block
        self.stream = mimi.streaming(batch_size=1)  # an ExitStack that resets the state when closed
        self.frames = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True) if background else None
        if self.thread:
            self.thread.start()

    def put(self, frame):
        """One frame (8,) of codes."""
        if self.error is not None:  # Mimi failed in its thread: stop the reply now, not after its last step
            raise self.error
        if self.thread:
            self.frames.put(frame)
        else:
            self._decode(frame)

    def _run(self):
        try:
            while (frame := self.frames.get()) is not None:
                self._decode(frame)
        except Exception as e:  # handed to the caller by close()
            self.error = e

    @torch.inference_mode()  # in whichever thread decodes
    def _decode(self, frame=None):
        """One frame in (None: the end of the reply, decode what is buffered); a full chunk's PCM out."""
        if frame is not None:
            self.pending.append(torch.as_tensor(frame, dtype=torch.long).reshape(mo.N_CODEBOOKS))
            if len(self.pending) < (self.frames_per_call if self.pcm else self.first_call_frames):
                return
        if not self.pending:
            return
        from moshi.utils.compile import no_cuda_graph  # on a GPU, moshi would capture CUDA graphs, which break
        codes = torch.stack(self.pending, dim=1)        # with a shorter last chunk or another thread: (8, n)
        self.pending = []
        with no_cuda_graph():
            pcm = self.mimi.decode(codes[None].to(next(self.mimi.parameters()).device))[0, 0].float().cpu().numpy()
        if self.first_audio is None:
            self.first_audio = time.perf_counter()
        self.pcm.append(pcm)  # (n * 1920,)
        if self.player:
            self.player.play(pcm)

    def close(self, drop_pending=False):
        """Decode what is left (or drop it: barge-in) and return the whole reply's PCM."""
        if drop_pending:
            while not self.frames.empty():
                self.frames.get_nowait()
        if self.thread:
            self.frames.put(None)
            self.thread.join()
        if not drop_pending and self.error is None:
            self._decode(None)
        self.stream.close()
        if self.error is not None:
            raise self.error
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)


class Player:
    """Plays 24 kHz PCM on the default output device as it arrives; stop() silences it at once."""

    def __init__(self):
        import sounddevice as sd  # raises OSError when the PortAudio library is absent
        self.buffer, self.lock = collections.deque(), threading.Lock()
        self.stream = sd.OutputStream(samplerate=mo.SAMPLE_RATE_MIMI, channels=1, dtype="float32",
                                      callback=self._fill)
        self.stream.start()

    def _fill(self, out, frames, time_info, status):  # sounddevice's audio thread asks for `frames` samples
        out.fill(0)
        done = 0
        with self.lock:
            while done < frames and self.buffer:
                chunk = self.buffer.popleft()
                n = min(frames - done, len(chunk))
                out[done:done + n, 0] = chunk[:n]
                done += n
                if n < len(chunk):  # the rest of it plays next time
                    self.buffer.appendleft(chunk[n:])

    def play(self, pcm):
        with self.lock:
            self.buffer.append(pcm)

    @property
    def busy(self):
        with self.lock:
            return bool(self.buffer)

    def stop(self):
        with self.lock:
            self.buffer.clear()

    def close(self):
        self.stream.close()


def sound_problem(e):
    """Why the sound card cannot be used, with what to install when it is the PortAudio library that is missing."""
    if "PortAudio library not found" not in str(e):
        return str(e)
    return f"{e}; install PortAudio: `apt-get install libportaudio2` (Debian, Ubuntu) or `brew install portaudio` " \
           "(macOS)"


def open_player():
    """A Player, or None (said once) when there is no sound output here."""
    try:
        return Player()
    except Exception as e:  # OSError without PortAudio, sounddevice.PortAudioError without a device
        print(f"(no sound output: {sound_problem(e)}; speech is not played, --out FILE keeps it)", file=sys.stderr)
        return None


def write_wav(path, pcm):
    """24 kHz speech as a 16-bit wav, atomically (a kill leaves the old file or the new one)."""
    import soundfile as sf
    with files.atomic_path(path) as tmp:  # the temporary name keeps the extension soundfile goes by
        sf.write(str(tmp), pcm, mo.SAMPLE_RATE_MIMI, subtype="PCM_16")


# -----------------------------------------------------------------------------------------------
# Speech in: the microphone, and Silero VAD cutting it into questions
# -----------------------------------------------------------------------------------------------

VAD_CHUNK = 512                     # samples per call at 16 kHz (32 ms), what Silero was trained on


class MicStream:
    """The default microphone as 16 kHz mono chunks of 512 samples (what Silero VAD takes).
    Iterating waits for the next chunk; poll() returns the chunks that arrived, without waiting."""

    def __init__(self):
        import sounddevice as sd
        self.chunks = queue.Queue()
        self.stream = sd.InputStream(samplerate=mo.SAMPLE_RATE_SPEECH, channels=1, dtype="float32",
                                     blocksize=VAD_CHUNK,
                                     callback=lambda data, *_: self.chunks.put(data[:, 0].copy()))
        self.stream.start()

    def __iter__(self):
        while True:
            yield self.chunks.get()

    def poll(self):
        return [self.chunks.get_nowait() for _ in range(self.chunks.qsize())]  # this thread alone takes from it


class VoiceActivity:
    """Feed 16 kHz mic chunks of 512 samples; returns 'start' when speech begins, 'end' when it stops, else None.
    Silero VAD: the silero_vad package ships its weights."""

    def __init__(self, threshold=0.5, min_silence_ms=300):
        from silero_vad import VADIterator, load_silero_vad
        self._vad = VADIterator(load_silero_vad(), threshold=threshold, sampling_rate=mo.SAMPLE_RATE_SPEECH,
                                min_silence_duration_ms=min_silence_ms)

    def __call__(self, chunk):
        chunk = torch.as_tensor(chunk, dtype=torch.float32)
        if chunk.shape != (VAD_CHUNK,):
            raise ValueError(f"VoiceActivity takes chunks of {VAD_CHUNK} samples at 16 kHz, got {tuple(chunk.shape)}")
        event = self._vad(chunk)  # None, {"start": sample} or {"end": sample}
        if not event:
            return None
        return "start" if "start" in event else "end"


class Listener:
    """Cuts a stream of 16 kHz chunks into utterances with Silero VAD (VoiceActivity).
    An utterance starts LEAD_IN_CHUNKS before the VAD's "start" and ends at its "end"."""

    def __init__(self, vad):
        self.vad, self.before, self.current = vad, collections.deque(maxlen=LEAD_IN_CHUNKS), None
        self.utterances = collections.deque()  # finished ones, oldest first

    @property
    def speaking(self):
        return self.current is not None

    def feed(self, chunk):
        event = self.vad(chunk)
        if self.current is None:
            self.before.append(chunk)
            if event == "start":
                self.current = list(self.before)
                self.before.clear()
        else:
            self.current.append(chunk)
            if event == "end":
                self.utterances.append(np.concatenate(self.current))
                self.current = None


# -----------------------------------------------------------------------------------------------
# A conversation
# -----------------------------------------------------------------------------------------------

@dataclass
class Reply:
    text: str
    frames: int                  # complete 80 ms frames generated
    pcm: np.ndarray              # 24 kHz speech (empty with --no_speech)
    steps: int                   # model steps run
    interrupted: bool            # stopped early (barge-in, Ctrl-C)
    seconds: float               # wall time of the reply
    first_audio_s: Optional[float]  # from the question to the first PCM, when there was speech


class TextStream:
    """Token ids in, printable text pieces out (a character can span several byte-level tokens). An empty
    think block at the start of the reply is not shown: the prompt already ends with one, and the chat
    text puts it back before every reply in the history. Nor is what comes before the first visible
    character (the model may open with blank lines); the token ids stay as they were made."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    @property
    def text(self):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        return (text[len(mo.EMPTY_THINK):] if text.startswith(mo.EMPTY_THINK) else text).lstrip()

    def add(self, token_id):
        self.ids.append(token_id)
        text = self.text
        if text.endswith("\ufffd") or mo.EMPTY_THINK.startswith(text):  # half a character, or maybe a think block
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


# Typed text never becomes control ids: only the chat template makes <|im_start|>, <|im_end|> and the
# placeholders. A control token's text inside a message (typed, or a reply of the model) is escaped before the
# template is applied, and prompt_ids encodes the text between the template's control tokens as plain text: an
# ordinary prompt gets exactly the ids of encoding it whole (what the model was trained on).
ESCAPE = "\ue000"  # a private-use character: after a control token's first character, it breaks the match


def control_tokens(tok):
    """The tokenizer's special tokens, longest first: {text: id}."""
    found = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def escaped(tok, text):
    """Message text made unable to produce a control id or an image mark (ESCAPE itself is dropped)."""
    text = text.replace(ESCAPE, "")
    for control in [*control_tokens(tok), mo.IMAGE_MARK]:
        text = text.replace(control, control[0] + ESCAPE + control[1:])
    return text


def prompt_ids(tok, text):
    """Token ids of chat text whose messages went through escaped(): the template's control tokens, and
    plain text between them (an escaped control token there becomes its characters, not its id)."""
    controls = control_tokens(tok)
    ids, pos = [], 0
    for match in re.finditer("|".join(map(re.escape, controls)), text):
        ids += plain_ids(tok, text[pos:match.start()]) + [controls[match.group()]]
        pos = match.end()
    return ids + plain_ids(tok, text[pos:])


def plain_ids(tok, text):
    if not text:
        return []
    tok.encode_special_tokens = True  # special tokens' text is encoded as the text it is
    try:
        return mo.encode(tok, text.replace(ESCAPE, ""))
    finally:
        tok.encode_special_tokens = False


OTHER_WEIGHTS = {  # a top-level module name in the weights -> what the file is, when it is not MiniMind-O
    "quantizer": "the Mimi codec (it goes to --mimi)",
    "xvector": "the CAM++ speaker encoder (its folder goes to --campplus)",
}
RESUME_FILE = ("a train.py resume state (--resume reads it); the weights are the <save_weight>_<hidden>.pth "
               "file beside it")


def other_weights(path):
    """What a file that is not MiniMind-O weights is (another published part, a resume state), or None."""
    import zipfile
    file = files.weights_file(path)
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, "pt") as f:
                names = list(f.keys())
        else:
            names = list(torch.load(file, map_location="cpu", weights_only=True))
    except Exception:  # not plain tensors: train.py's resume state also pickles its random states
        try:
            with zipfile.ZipFile(file) as z:
                pickled = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
        except (zipfile.BadZipFile, OSError):
            return None
        return RESUME_FILE if b"optimizer" in pickled and b"position" in pickled else None
    tops = {str(n).split(".")[0] for n in names}
    return next((what for top, what in OTHER_WEIGHTS.items() if top in tops), None)


def int8_linears(model):
    """CPU speed-up: every Linear layer's weights in int8, activations quantised on the fly (PyTorch's
    dynamic quantisation). A decoding step reads each weight once and is bound by memory traffic, so
    weights 4x smaller make steps about 1.5x faster on 2 cores; outputs differ slightly from float32."""
    import warnings
    with warnings.catch_warnings():  # deprecated for torchao from torch 2.10 on; moshi pins torch < 2.10
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


LOADERS = {  # a side module's key in files.PARTS -> how it loads: (path, device) -> the module
    "mimi": files.load_mimi, "campplus": files.load_speaker_encoder, "sensevoice": files.load_speech_encoder,
    "siglip": files.load_vision_encoder, "voices": lambda path, device: files.load_voices(path)}


class Chat:
    """The model, the history of the conversation, the voice, and the side modules (loaded on first use)."""

    def __init__(self, args, player=None):
        self.args, self.player = args, player
        self.device = torch.device(args.device)
        try:
            with files.loading("checkpoint", args.checkpoint):
                self.model = files.load_model(args.checkpoint, self.device, getattr(torch, args.dtype))
        except files.DamagedPartError:
            other = other_weights(args.checkpoint)
            if other is None:
                raise
            raise ValueError(f"--checkpoint {args.checkpoint} is {other}, not MiniMind-O weights") from None
        if args.int8:
            self.model = int8_linears(self.model)
        with files.loading("tokenizer", args.tokenizer):
            self.tok = mo.load_tokenizer(args.tokenizer)
        self.history = []     # earlier turns: [{"role", "content"}], text only (their speech is not kept)
        self.image = None     # (64, 768) features of the conversation's image (the latest one shown)
        self.voice = None     # {"ref_codes": (8, R), "spk_emb": (192,)} or None: the model's own voice
        self.parts = {}

    def part(self, key):
        """A side module, loaded the first time it is needed (a clear listing if its files are missing)."""
        if key not in self.parts:
            missing = files.missing_report(self.args, [key])
            if missing:
                raise FileNotFoundError(missing)
            with files.loading(key, getattr(self.args, key)):
                self.parts[key] = LOADERS[key](getattr(self.args, key), self.device)
        return self.parts[key]

    def conversation(self, player=None):
        """Another conversation with this one's model, tokenizer, side modules and voice (the web chat: one
        per browser tab), starting afresh."""
        other = copy.copy(self)
        other.player = player
        other.reset()
        return other

    def reset(self):
        self.history, self.image = [], None

    def set_voice(self, spec, save_as=None):
        """spec: a name in --voices, an audio file to clone, or 'none'. Returns a line saying what was set."""
        if spec.lower() == "none":
            self.voice = None
            return "voice: the model's own (no voice prompt)"
        if os.path.isfile(spec):
            voice = files.clone_voice(spec, self.part("mimi"), self.part("campplus"))
            if save_as:  # never into the release's file: --download could then not tell it is missing
                files.save_voice(self.args.my_voices, save_as, voice)
            self.voice = voice
            saved = f", saved as {save_as!r} in {self.args.my_voices}" if save_as else ""
            return f"voice: cloned from {spec} ({voice['ref_codes'].shape[1]} frames){saved}"
        if spec.lower().endswith(AUDIO_EXTENSIONS) or os.sep in spec:
            raise FileNotFoundError(f"voice file {spec} not found")
        voices = self.voices()
        if spec not in voices:
            raise ValueError(f"no voice {spec!r} (there are: {', '.join(sorted(voices)) or 'none'}); give an audio "
                             f"file to clone{self.released_voices_hint()}")
        self.voice = voices[spec]
        return f"voice: {spec}"

    def released_voices(self):
        """The release's voices (name -> voice), {} when --voices is not there."""
        return self.part("voices") if files.PARTS["voices"].present(self.args.voices) else {}

    def voices(self):
        """The release's voices and the ones cloned with --save_voice (--my_voices)."""
        return {**self.released_voices(), **my_voices(self.args)}

    def released_voices_hint(self):
        if files.PARTS["voices"].present(self.args.voices):
            return ""
        get = files.PARTS["voices"].how
        return f"; the released voices are not in {self.args.voices}: get them with {get} or --download"

    def user_turn(self, text, audio, image):
        """The user's message -> (prompt text, the same without its speech placeholders (what the history
        keeps: only the last question's speech can be injected), speech features or None, the image's
        (64, 768) features or None). Changes nothing in the conversation: a turn that fails leaves no trace."""
        text, audio_embeds, image_feats = escaped(self.tok, text.replace(mo.IMAGE_MARK, "").strip()), None, None
        if image is not None:  # one image per conversation: a new one replaces the old
            encoder, processor = self.part("siglip")
            image_feats = mo.encode_images(encoder, processor, [files.open_image(image)])[0]  # (64, 768)
            text = f"{text}\n\n{mo.IMAGE_MARK}" if text else mo.IMAGE_MARK
        content = text
        if audio is not None:  # a file, or a 16 kHz waveform from the microphone
            wav = audio if isinstance(audio, np.ndarray) else files.load_audio(audio, mo.SAMPLE_RATE_SPEECH)
            self.check_question_length(wav)
            feats = mo.encode_speech(self.part("sensevoice"), [wav])[0]                 # (L, 512)
            content = mo.place_audio(text, len(feats), "text_blankline_audio" if text else "audio_only")
            audio_embeds = [feats]
        if not content:
            raise ValueError("nothing to answer: give some text, an audio file or an image")
        return content, text, audio_embeds, image_feats

    def check_question_length(self, wav16k):
        """Refuse, before encoding it, speech longer than the prompt may be (--max_context tokens, one per
        SenseVoice frame): a 10-minute question would take ~10k tokens and gigabytes of memory."""
        seconds = len(wav16k) / mo.SAMPLE_RATE_SPEECH
        longest = self.args.max_context * SPEECH_FRAME_S
        if seconds > longest:
            raise ValueError(f"the spoken question is {seconds:.0f} s long, about {seconds / SPEECH_FRAME_S:.0f} "
                             f"tokens; at most {longest:.0f} s fit --max_context {self.args.max_context}: cut it "
                             "shorter (or raise --max_context)")

    def prompt(self, history, turn):
        """Token ids of system + history + turn + the reply's start, and the history they kept: the oldest
        question and answer go first while the prompt is longer than --max_context."""
        system = [{"role": "system", "content": escaped(self.tok, self.args.system)}] if self.args.system else []
        positions = self.model.config.max_position_embeddings - self.args.max_new_tokens
        while True:
            text = mo.render_chat(system + history + [turn], add_generation_prompt=True)
            ids = prompt_ids(self.tok, mo.expand_image_marks(text))
            if len(ids) <= min(self.args.max_context, positions) or not history:
                break
            history = history[2:]
        if len(ids) > positions:
            raise ValueError(f"the prompt is {len(ids)} tokens: with --max_new_tokens {self.args.max_new_tokens} "
                             f"it does not fit the model's {self.model.config.max_position_embeddings} positions")
        if len(ids) > self.args.max_context:  # every earlier turn is gone: the question itself is too long
            raise ValueError(f"the question is {len(ids)} tokens with its template, more than --max_context "
                             f"{self.args.max_context}: shorten it, or raise --max_context")
        return ids, history

    def ask(self, text="", audio=None, image=None, interrupt=lambda: False, on_text=None):
        """Answer one turn, streaming: on_text(piece) as text is decoded, speech to the player as it is made.
        interrupt() is asked after every step; True stops the reply there (barge-in)."""
        start = time.perf_counter()
        content, remembered, audio_embeds, new_image = self.user_turn(text, audio, image)
        history, image_feats = self.history, self.image
        if new_image is not None:  # the old image's marks go: only one image's features can be injected
            history = [dict(t, content=t["content"].replace(mo.IMAGE_MARK, "").strip()) for t in history]
            image_feats = new_image
        turn = {"role": "user", "content": content}
        ids, history = self.prompt(history, turn)
        has_image = any(mo.IMAGE_MARK in t["content"] for t in history + [turn])
        reply = self.reply(start, ids, audio_embeds, [image_feats] if has_image else None, interrupt, on_text)
        self.image = image_feats
        self.history = history + [{"role": "user", "content": remembered},
                                  {"role": "assistant", "content": escaped(self.tok, reply.text)}]
        return reply

    def reply(self, start, ids, audio_embeds, image_embeds, interrupt, on_text):
        """Run the model on the prompt's ids, streaming its text to on_text and its frames to the speech out."""
        a, voice = self.args, self.voice or {}
        speech = None if a.no_speech else SpeechOut(self.part("mimi"), a.frames_per_call, self.player)
        steps = mo.stream_generate(
            self.model, ids, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
            repetition_penalty=a.repetition_penalty, greedy=a.greedy, ref_codes=voice.get("ref_codes"),
            spk_emb=voice.get("spk_emb"), audio_embeds=audio_embeds, image_embeds=image_embeds)
        text_out, n_steps, n_frames, interrupted = TextStream(self.tok), 0, 0, False
        try:
            for step in steps:
                n_steps += 1
                if step.text == mo.IM_END and speech is None:
                    break  # text only: the Talker's steps to the end of its speech would be wasted
                if step.text is not None and step.text != mo.IM_END:
                    piece = text_out.add(step.text)
                    if piece and on_text:
                        on_text(piece)
                if step.frame is not None:
                    n_frames += 1
                    if speech:
                        speech.put(step.frame)
                if interrupt():
                    interrupted = True
                    break
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            interrupted = True
        finally:
            steps.close()
            pcm = speech.close(drop_pending=interrupted) if speech else np.zeros(0, np.float32)
        if interrupted and self.player:
            self.player.stop()
        first = speech.first_audio - start if speech and speech.first_audio else None
        return Reply(text_out.text, n_frames, pcm, n_steps, interrupted, time.perf_counter() - start, first)


# -----------------------------------------------------------------------------------------------
# The terminal chat: spoken (--mic), typed, or one shot
# -----------------------------------------------------------------------------------------------

def converse(chat, mic, vad, echo=print, on_reply=lambda reply: None):
    """Speak, pause, hear the reply; speaking during a reply stops it and the new question is heard.
    mic: a MicStream, or a recording with its iteration and poll(); on_reply(reply) after each reply. Returns the
    replies, in order."""
    listener, replies = Listener(vad), []

    def barge_in():  # called after every model step: take in what the mic heard meanwhile
        for chunk in mic.poll():
            listener.feed(chunk)
        return listener.speaking or bool(listener.utterances)

    for chunk in mic:
        listener.feed(chunk)
        while listener.utterances:
            question = listener.utterances.popleft()
            echo(f"you: ({len(question) / mo.SAMPLE_RATE_SPEECH:.1f} s of speech)")
            echo("model: ", end="", flush=True)
            reply = chat.ask(audio=question, interrupt=barge_in, on_text=lambda s: echo(s, end="", flush=True))
            echo(" [interrupted]" if reply.interrupted else "")
            replies.append(reply)
            on_reply(reply)
            while chat.player and chat.player.busy and not reply.interrupted:  # the reply is still playing
                time.sleep(PLAYBACK_POLL_S)
                if barge_in():
                    chat.player.stop()
                    echo("[interrupted]")
    return replies


def numbered(path, n):
    path = Path(path)
    return path.with_name(f"{path.stem}_{n:02d}{path.suffix or '.wav'}")


def parse_line(line):
    """'/image a.jpg /audio q.wav what's it?' -> {'image': 'a.jpg', 'audio': 'q.wav', 'text': "what's it?"}.
    File names may be quoted ('/audio "my question.wav"'); the question itself is kept exactly as typed."""
    found, rest = {}, line.strip()
    while rest.split(maxsplit=1)[:1] in (["/audio"], ["/image"]):
        words = shlex.shlex(rest, posix=True)
        words.whitespace_split = True
        command, file = words.get_token(), words.get_token()
        if file is None:
            raise ValueError(f"{command} needs a file")
        found[command[1:]] = file
        rest = words.instream.read().strip()  # what follows the file name, untouched
    found["text"] = rest
    return found


def report(reply, out=None):
    audio = f", {len(reply.pcm) / mo.SAMPLE_RATE_MIMI:.1f} s of speech" if len(reply.pcm) else ""
    first = f", first sound after {reply.first_audio_s:.2f} s" if reply.first_audio_s else ""
    saved = f" -> {out}" if out else ""
    print(f"({reply.steps} steps in {reply.seconds:.1f} s{audio}{first}{saved})", file=sys.stderr)


def saver(out):
    """on_reply for a conversation: each reply's speech to a numbered file (with --out), and its report line."""
    replies = itertools.count(1)

    def save(reply):
        path = numbered(out, next(replies)) if out and len(reply.pcm) else None
        if path:
            write_wav(path, reply.pcm)
        report(reply, path)
    return save


def interactive(chat, args):
    print("MiniMind-O: type a question, /audio FILE, /image FILE, /voice NAME|FILE, /reset, /quit (--help: more)")
    save = saver(args.out)
    while True:
        try:
            line = input("you: ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                chat.reset()
                print("(conversation forgotten)")
                continue
            if line.split()[0] == "/voice":
                rest = line[len("/voice"):].strip()
                print(chat.set_voice(rest) if rest else "voices: " + (", ".join(sorted(chat.voices())) or "none")
                      + chat.released_voices_hint())
                continue
            if line.startswith("/") and line.split()[0] not in ("/audio", "/image"):
                print(f"unknown command {line.split()[0]} (commands: /audio /image /voice /reset /quit)")
                continue
            request = parse_line(line)
            print("model: ", end="", flush=True)
            reply = chat.ask(**request, on_text=lambda s: print(s, end="", flush=True))
            print(" [stopped]" if reply.interrupted else "")
            save(reply)
        except (FileNotFoundError, ValueError) as e:  # a bad file or command: say so, keep chatting
            print(f"\n{e}")
        except KeyboardInterrupt:  # Ctrl-C while a question is still being heard or seen
            print("\n(stopped)")
        except Exception as e:  # e.g. Mimi failing mid-reply: the conversation so far is kept
            print(f"\nerror: {type(e).__name__}: {e} (the conversation goes on; /reset to start afresh)")


def one_shot(chat, args):
    """--text, --audio, --image: one reply, printed, written to --out, played to its end."""
    reply = chat.ask(args.text or "", args.audio, args.image, on_text=lambda s: print(s, end="", flush=True))
    print()
    if args.out:
        write_wav(args.out, reply.pcm)
    report(reply, args.out)
    while chat.player and chat.player.busy:  # let the last of it play
        time.sleep(PLAYBACK_POLL_S)
    return reply


# -----------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  python chat.py                                     interactive: type, or use the commands below
  python chat.py --voice vivian                      ... in a released voice (from models/voices.pt)
  python chat.py --voice me.wav --save_voice me      ... in a voice cloned from a clip, kept for next time
  python chat.py --text "Why is the sky blue?" --out reply.wav     one shot, for scripts
  python chat.py --audio question.wav --out reply.wav              a spoken question
  python chat.py --image cat.jpg --text "What is this?"            a question about a picture
  python chat.py --mic                               live: speak, pause, listen; talk over it to interrupt
                                                     (use headphones, or it hears itself)
  python chat.py --web                               in a web page (http://127.0.0.1:8000): type, speak, call
                                                     hands-free and talk over it; from a laptop to a GPU box:
                                                     ssh -L 8000:localhost:8000 you@box, then open that address
  python chat.py --checkpoint out/demo/demo_64.pth --no_speech   a train.py checkpoint (the demo's: text only)
  python chat.py --download                          fetch the missing published files (online)

interactive commands:
  any text                     ask it
  /audio FILE [text]           ask with speech (FILE: wav, flac, ogg, mp3 ...)
  /image FILE [text]           ask about an image (kept for follow-up questions until /reset)
  /image FILE /audio FILE      both, with or without text
  /voice NAME | FILE | none    switch voice (no argument: list the voices)
  /reset                       forget the conversation
  /quit                        leave (or Ctrl-D); Ctrl-C stops a reply
"""


nucleus = files.number(float, lambda p: 0 < p <= 1, "in (0, 1]: the share of probability kept")
port_number = files.number(int, lambda n: 0 <= n < 2 ** 16, "a port, 0 to 65535")
cpu_threads = files.number(int, lambda n: 1 <= n <= os.cpu_count(),  # more threads than cores only wait on each other
                           f"a number of threads from 1 to this machine's {os.cpu_count()} cores")


def device_name(value):
    try:
        torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a PyTorch device (cpu, cuda, cuda:1, mps)") from None
    return value


def check_out(path, one_shot):
    """The problem with --out, or None: what it names must be a file of a format soundfile writes as 16-bit
    PCM (the interactive chat's numbered files add .wav to a name without one). Said before any reply is made."""
    import soundfile as sf
    if Path(path).is_dir():
        return f"--out {path} is a folder; give a file name such as {Path(path) / 'reply.wav'}"
    fmt = Path(path if one_shot else numbered(path, 1)).suffix[1:].upper()
    if not (fmt in sf.available_formats() and sf.check_format(fmt, "PCM_16")):
        return f"--out {path}: cannot write 16-bit sound as {Path(path).suffix or '(no extension)'}; use .wav or .flac"
    folder = Path(path).parent
    try:
        tempfile.TemporaryFile(dir=folder).close()  # a file can be made there (it is gone when closed)
    except OSError as e:
        return f"--out {path}: cannot write in {folder} ({e.strerror})"
    return None


def default_checkpoint(*candidates):
    """The first candidate that holds weights, else the first (reported as missing where it matters)."""
    return next((str(c) for c in candidates if files.weights_file(str(c))), str(candidates[0]))


def question_flags(parser):
    """Where the questions come from: one shot, the microphone, or the web page."""
    ask = parser.add_argument_group("one shot (for scripts)")
    ask.add_argument("--text", help="the question, as text")
    ask.add_argument("--audio", metavar="FILE", help="the question, spoken (any audio file)")
    ask.add_argument("--image", metavar="FILE", help="an image the question is about")
    ask.add_argument("--out", metavar="WAV", help="write the spoken reply here (interactive: one numbered file per "
                     "reply, REPLY_01.wav ...)")
    ask.add_argument("--mic", action="store_true", help="live conversation through the microphone, with Silero VAD "
                     "and barge-in")
    page = parser.add_argument_group("web page")
    page.add_argument("--web", action="store_true", help="serve the chat as a web page (chat_web.html): type, hold "
                      "to talk or call hands-free with barge-in, images, voices; each browser tab its own conversation")
    page.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine "
                      "only; any other lets everyone who can reach the port use it)")
    page.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free one, printed)")
    page.add_argument("--ssl_cert", metavar="PEM", help="serve https with this certificate (browsers allow the "
                      "microphone only on https or localhost)")
    page.add_argument("--ssl_key", metavar="PEM", help="the certificate's private key")
    page.add_argument("--max_sessions", type=files.positive, default=4, metavar="N", help="browser tabs served at once "
                      "(default 4; they share the model, one reply at a time)")


def voice_flags(parser):
    """Which voice speaks (and cloning one); where the published files are, and --download."""
    voice = parser.add_argument_group("voice")
    voice.add_argument("--voice", metavar="NAME|FILE", help="a voice from --voices, or an audio clip to clone "
                       "(1-24 s of clean speech); default: the model's own")
    voice.add_argument("--save_voice", metavar="NAME", help="keep the voice cloned from --voice FILE in --my_voices "
                       "under NAME")
    voice.add_argument("--voices", default=files.PARTS["voices"].default, help="the release's voices file (default "
                       "models/voices.pt; --download fetches it)")
    voice.add_argument("--my_voices", default=str(files.MODELS / "my_voices.pt"), help="the voices you cloned with "
                       "--save_voice, kept apart from the released ones (default models/my_voices.pt)")
    parts = parser.add_argument_group("published files (see --download)")
    parts.add_argument("--checkpoint", default=default_checkpoint(files.MODELS / "minimind-3o", files.MODELS / "sft_omni_768.pth"),
                       help="released folder or .pth, or a train.py checkpoint (default models/minimind-3o, else "
                            "models/sft_omni_768.pth)")
    parts.add_argument("--tokenizer", help="folder with tokenizer.json (default: the checkpoint's folder if it has "
                       "one, else models/minimind-3o)")
    parts.add_argument("--mimi", default=files.PARTS["mimi"].default, help=f"folder with {files.MIMI_WEIGHTS}, or the file")
    parts.add_argument("--sensevoice", default=files.PARTS["sensevoice"].default, help="SenseVoiceSmall folder")
    parts.add_argument("--siglip", default=files.PARTS["siglip"].default, help="SigLIP2 folder")
    parts.add_argument("--campplus", default=files.PARTS["campplus"].default, help=f"folder with {files.CAMPP_WEIGHTS}")
    parts.add_argument("--download", action="store_true", help="first fetch the missing parts (those a one-shot "
                       "question needs, or all for the interactive chat) from Hugging Face (voices.pt from GitHub), "
                       "then go on")


def generation_flags(parser):
    """How replies are sampled; the device, precision and speech output that make them."""
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=files.positive, default=1024, help="steps per reply at most (one step = "
                     "one text token and 80 ms of speech; default 1024)")
    gen.add_argument("--max_context", type=files.positive, default=2048,
                     help="earlier turns are forgotten, oldest first, while the prompt is longer than this many "
                          "tokens (default 2048; the model was trained on samples of 512-1024, and every reply "
                          "reads the whole prompt again)")
    gen.add_argument("--temperature", type=files.finite_at_least_0, default=0.75,
                     help="text sampling temperature (default 0.75)")
    gen.add_argument("--top_p", type=nucleus, default=0.9, help="text nucleus sampling (default 0.9)")
    gen.add_argument("--repetition_penalty", type=files.finite_above_0, default=1.0,
                     help="text repetition penalty (default 1.0)")
    gen.add_argument("--greedy", action="store_true", help="always the most likely text token and codes")
    gen.add_argument("--seed", type=files.random_seed, help="random seed, for a repeatable reply")
    gen.add_argument("--system", help="a system prompt")
    run = parser.add_argument_group("running")
    run.add_argument("--no_speech", action="store_true", help="text replies only (no Mimi needed)")
    run.add_argument("--mute", action="store_true", help="do not play the speech (--out still writes it)")
    run.add_argument("--frames_per_call", type=int, default=2, choices=range(1, 5), metavar="{1..4}",
                     help="Mimi frames (80 ms each) per decode call, after the first frame (decoded alone, "
                          "for the earliest sound): 1 = least delay, 4 = least CPU (default 2)")
    run.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cpu, cuda (or cuda:N) or mps (default: cuda when PyTorch sees a GPU, else cpu)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="model weights (default float32; bfloat16 suits GPUs)")
    run.add_argument("--int8", action="store_true",
                     help="CPU only: int8 weights in every Linear layer, about 1.5x faster steps on 2 cores, "
                          "at a small cost in accuracy")
    run.add_argument("--threads", type=cpu_threads, help="CPU threads for PyTorch (default: its own choice)")


def check_flags(p, args):
    """Refuse what cannot work together, naming the flags; fill in the defaults that depend on others."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: PyTorch sees no CUDA GPU here; use --device cpu")
    if args.int8 and (args.device != "cpu" or args.dtype != "float32"):
        p.error("--int8 is for --device cpu --dtype float32 (PyTorch's dynamic int8 kernels take float32 on the CPU)")
    if args.mic and (args.text or args.audio or args.image):
        p.error("--mic is a spoken conversation: it takes no --text, --audio or --image")
    if args.web and (args.text or args.audio or args.image or args.mic or args.out):
        p.error("--web serves the chat as a page: it takes no --text, --audio, --image, --mic or --out")
    if bool(args.ssl_cert) != bool(args.ssl_key):
        p.error("--ssl_cert and --ssl_key go together (a certificate and its private key)")
    if args.tokenizer is None:
        ckpt = Path(args.checkpoint)
        args.tokenizer = str(ckpt if (ckpt / "tokenizer.json").is_file() else files.PARTS["tokenizer"].default)
    if args.save_voice and not (args.voice and os.path.isfile(args.voice)):
        p.error("--save_voice NAME needs --voice FILE (an audio clip to clone)")
    try:
        if args.save_voice is not None:
            files.check_voice_name(args.save_voice)
    except ValueError as e:
        p.error(f"--save_voice: {e}")
    if args.no_speech and args.out:
        p.error("--out writes the spoken reply: it cannot go with --no_speech")
    if args.text is not None and not args.text.strip():
        p.error("--text is empty: give the question, or leave --text out for the interactive chat")
    problem = args.out and check_out(args.out, one_shot=bool(args.text or args.audio or args.image))
    if problem:
        p.error(problem)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="chat.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Talk with MiniMind-O in text, speech and images; it answers in text and streaming speech\n"
                    "(24 kHz, played as it is made when there is a sound card). Without --text/--audio/--image/\n"
                    "--mic it is interactive.")
    question_flags(p)
    voice_flags(p)
    generation_flags(p)
    args = p.parse_args(argv)
    check_flags(p, args)
    return args


def parts_needed(args):
    keys = ["checkpoint", "tokenizer"] + ([] if args.no_speech else ["mimi"])
    if args.audio or args.mic:
        keys.append("sensevoice")
    if args.image:
        keys.append("siglip")
    if args.voice and os.path.isfile(args.voice):
        keys += ["mimi", "campplus"]
    elif args.voice and args.voice != "none" and args.voice not in my_voices(args):
        keys.append("voices")
    return list(dict.fromkeys(keys))


def my_voices(args):
    """The voices cloned with --save_voice (name -> voice), {} before the first."""
    return files.load_voices(args.my_voices) if os.path.isfile(args.my_voices) else {}


def load_session(args, player):
    """The Chat, with every part this session needs loaded now (said, and timed apart): the first reply's
    time, and its first sound, then measure the reply, not the loading."""
    keys = parts_needed(args)
    started = time.perf_counter()
    print(f"loading {', '.join(files.PARTS[k].name for k in keys)} ...", file=sys.stderr, flush=True)
    chat = Chat(args, player)
    for key in keys:
        if key in ("mimi", "sensevoice", "siglip"):  # voices and CAM++ are loaded by set_voice, also at start
            chat.part(key)
    print(f"(loaded in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return chat


def get_parts(args):
    """--download what this run may need (everything for the interactive chat), then stop with one listing of
    what is still missing, if anything is."""
    if args.download:  # the interactive chat may need any part; a one-shot question or --mic only its own
        one_shot = args.text or args.audio or args.image or args.mic
        failures = files.download(args, parts_needed(args) if one_shot else list(files.PARTS))
        if failures:
            sys.exit("download failed:\n  " + "\n  ".join(failures))
    missing = files.missing_report(args, parts_needed(args))
    if missing:
        sys.exit(f"chat.py: {missing}")


def main(argv=None):
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    get_parts(args)
    player = None if args.no_speech or args.mute or args.web else open_player()
    try:
        chat = load_session(args, player)
        if args.voice:
            print(chat.set_voice(args.voice, args.save_voice), file=sys.stderr)
        if args.web:
            import web  # the web chat's own module, only when it is asked for
            if files.PARTS["sensevoice"].present(args.sensevoice):  # loaded now, not during the first spoken question
                chat.part("sensevoice")
            return web.serve_web(chat, args, lambda silence_ms: Listener(VoiceActivity(min_silence_ms=silence_ms)),
                                 VAD_CHUNK)
        if args.mic:
            try:
                mic = MicStream()
            except Exception as e:  # OSError without PortAudio, sounddevice.PortAudioError without a microphone
                sys.exit(f"chat.py: --mic needs a microphone ({sound_problem(e)})")
            print("listening: speak, then pause (Ctrl-C to leave)", file=sys.stderr)
            return converse(chat, mic, VoiceActivity(), on_reply=saver(args.out))
        if args.text or args.audio or args.image:
            return one_shot(chat, args)
        return interactive(chat, args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat.py: {e}")
    except KeyboardInterrupt:
        print()
    finally:
        if player:
            player.close()


if __name__ == "__main__":
    main()
