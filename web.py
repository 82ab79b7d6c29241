"""
The web chat (python chat.py --web): one page (chat_web.html), a WebSocket per browser tab, one model.

Page -> server, on /ws: JSON messages
  {"type": "ask", "id", "text", "image": FILE | null, "audio": FILE | null}     FILE = {"name", "data": base64}
  {"type": "voice", "id", "name": NAME | "none"}  or  {"type": "voice", "id", "clip": FILE}   (clone it)
  {"type": "mic", "mode": "call" | "hold" | "send" | "off"}   {"type": "stop"}   {"type": "reset"}
and binary frames: the microphone, mic_frame samples of 16 kHz mono int16 each (what Silero VAD takes).
Server -> page: JSON {"type": "hello" | "queued" | "reply_start" | "text" | "reply_end" | "cancelled" |
"speech_start" | "speech_end" | "voice" | "reset" | "error" | "refused", ...} and binary frames: the reply's
24 kHz mono int16 speech, as Mimi decodes it. Each tab's messages reach it in the order they were made.

The model is one: its work (questions, cloning) runs in one thread, one turn at a time, first come first
served. Each tab has its own conversation, voice and microphone; stopping a reply stops only that tab's.
chat.py hands over its Chat and a maker of microphone Listeners (serve_web): this file never imports chat.py.

Parts, in order: the limits; the files the page sends (`received_file`, `uploaded_audio`, `uploaded_image`);
one tab (`TurnStop`, `WebTab`); the server (`WebChat`, `web_banner`, `ssl_context`, `serve_web`).
"""
import asyncio
import base64
import binascii
import io
import itertools
import json
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web  # web: aiohttp's server

import minimind_o as mo  # sample rates, resampling
import files             # reading the user's audio


WEB_PAGE = Path(__file__).resolve().parent / "chat_web.html"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")  # every interface of this machine
MAX_UPLOAD_MB = 10            # one image, audio file or voice clip
MAX_AUDIO_S = 30              # a spoken question, audio file or voice clip (SenseVoice: ~17 prompt tokens a second)
MAX_TEXT_CHARS = 4000         # a typed question
VAD_SILENCE_MS = 300          # this much silence ends a spoken question
PCM16_FULL_SCALE = 32767
WS_HEARTBEAT_S = 30           # pings find a tab whose connection died without closing
# A message: at most an image and an audio file, in base64 (4/3 their size), and the JSON around them
MAX_MESSAGE_BYTES = int(2 * MAX_UPLOAD_MB * 2 ** 20 * 4 / 3) + 2 ** 20


# -- The files the page sends: base64 in JSON, checked and read before the model hears of them ------------

def received_file(field, what):
    """A file from the page, {"name", "data": base64} -> (name, bytes); None stays None."""
    if field is None:
        return None
    name = str(field.get("name") or what)[:100] if isinstance(field, dict) else what
    try:
        data = base64.b64decode(field["data"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise ValueError(f"{what} {name}: not a file as the page sends it") from None
    if len(data) > MAX_UPLOAD_MB * 2 ** 20:
        raise ValueError(f"{what} {name} is {len(data) / 2 ** 20:.1f} MB: at most {MAX_UPLOAD_MB} MB")
    if not data:
        raise ValueError(f"{what} {name} is empty")
    return name, data


def uploaded_audio(upload, what=""):
    """(name, bytes) of an audio file -> 16 kHz samples (S,), or a ValueError that names it (`what` first)."""
    name = f"{what} {upload[0]}" if what else upload[0]
    try:
        wav, rate = files.read_audio(upload[1])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if len(wav) > MAX_AUDIO_S * rate:
        raise ValueError(f"{name} lasts {len(wav) / rate:.0f} s: at most {MAX_AUDIO_S} s of audio is heard")
    return mo.resample(wav, rate, mo.SAMPLE_RATE_SPEECH)


def uploaded_image(upload):
    """(name, bytes) of an image -> a PIL image, or a ValueError that names the file."""
    from PIL import Image
    try:
        image = Image.open(io.BytesIO(upload[1]))
        image.load()
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{upload[0]} is not an image that can be read ({e})") from None
    return image


# -- One browser tab: its conversation, microphone and questions --------------------------------------------

class TurnStop(threading.Event):
    """Set when a question's reply must stop (barge-in, Stop, a new question, the tab closing). Called, as
    Chat.ask's interrupt after every model step, it says whether to stop. It notes when it was set and when
    the model first heard it, so that the reply's end can say how fast it stopped. `running`: the model is on it."""
    asked_at = heard_at = None
    running = False

    def set(self):
        if not self.is_set():
            self.asked_at = time.perf_counter()
        super().set()

    def __call__(self):
        if self.is_set() and self.heard_at is None:
            self.heard_at = time.perf_counter()
        return self.is_set()


class WebTab:
    """One browser tab: its conversation (a Chat sharing the model; the tab is its player), microphone, question."""

    def __init__(self, server, ws, number):
        self.server, self.ws, self.number = server, ws, number
        self.chat = server.chat.conversation(player=self)
        self.loop = asyncio.get_running_loop()
        self.outbox = asyncio.Queue()  # str (JSON) or bytes (speech) for the page, in order
        self.turn = None               # the asyncio task of this tab's latest question
        self.stopping = TurnStop()     # that question's
        self.voice_change = None       # the asyncio task of this tab's latest voice change
        self.voice_stop = TurnStop()   # that voice change's (only its `running` counts: cloning cannot be cut short)
        self.mic_mode, self.listener, self.held = "off", None, []
        self.mic_frames = 0            # frames heard since the call started: the page counts them too
        self.spoken = itertools.count(1)

    # -- to the page, from any thread

    def put(self, message):
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, message)

    def send(self, kind, **fields):
        self.put(json.dumps({"type": kind, **fields}))

    def play(self, pcm):  # as the Chat's player, in Mimi's thread: (S,) float32 at 24 kHz, to 16-bit frames
        pcm16 = np.clip(pcm * PCM16_FULL_SCALE, -PCM16_FULL_SCALE, PCM16_FULL_SCALE).astype("<i2")
        self.put(pcm16.tobytes())

    def stop(self):  # Chat.ask calls it on barge-in; the page stops playing as soon as it hears of that
        pass

    async def pump(self):
        try:
            while True:
                message = await self.outbox.get()
                await (self.ws.send_bytes if isinstance(message, bytes) else self.ws.send_str)(message)
        except ConnectionResetError:  # the tab went away: what is still queued has no one to go to
            pass

    # -- from the page

    async def run(self):
        """Serve the tab until its connection closes; then its reply stops, and what it queued never starts."""
        pump = asyncio.create_task(self.pump())
        self.send("hello", **self.server.hello(self))
        try:
            async for message in self.ws:
                if message.type == WSMsgType.BINARY:
                    self.hear(message.data)
                elif message.type == WSMsgType.TEXT:
                    await self.on_message(message.data)
        finally:
            self.interrupt()
            if self.voice_change and not self.voice_stop.running:
                self.voice_change.cancel()
            pump.cancel()

    async def on_message(self, data):
        try:
            message = json.loads(data)
            handler = {"ask": self.ask, "voice": self.voice, "mic": self.mic, "stop": self.stop_reply,
                       "reset": self.reset}[message["type"]]
        except (ValueError, KeyError, TypeError):
            self.send("error", id=None, message=f"not a message this server knows: {str(data)[:80]}")
            return
        try:
            await handler(message)
        except ValueError as e:  # a bad question, file or setting: said in the page, the tab goes on
            self.send("error", id=message.get("id"), message=str(e))
        except Exception as e:  # a message no check foresaw: said, logged, and the tab still goes on
            traceback.print_exc()
            self.send("error", id=message.get("id"), message=f"{type(e).__name__}: {e}")

    async def ask(self, message):
        text = message.get("text") or ""
        if not isinstance(text, str):
            raise ValueError("the question's text must be a string")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"the question is {len(text)} characters long: at most {MAX_TEXT_CHARS}")
        image, audio = received_file(message.get("image"), "image"), received_file(message.get("audio"), "audio")
        turn_id = message.get("id")
        self.start(turn_id, lambda stop: self.answer(  # the files are read in the model's thread, not the event loop's
            turn_id, stop, text, image and uploaded_image(image), audio and uploaded_audio(audio)))

    async def voice(self, message):
        if self.voice_change and not self.voice_change.done():  # before its clip is decoded: one clip at a time
            raise ValueError("a voice is already being set for this tab (cloning takes a while): wait for it")
        name, clip, turn_id = message.get("name"), received_file(message.get("clip"), "voice clip"), message.get("id")
        if clip is None and name != "none" and name not in self.server.voices:  # never a path on the server
            raise ValueError(f"no voice {name!r} here (there are: {', '.join(self.server.voices) or 'none'})")
        # After this tab's reply, if one is running: a voice change does not cut it short
        self.voice_stop = TurnStop()
        self.voice_change = asyncio.create_task(self.server.use_model(
            self, turn_id, lambda: self.change_voice(turn_id, name, clip), self.voice_stop))

    async def mic(self, message):
        mode = message.get("mode")
        if mode not in ("call", "hold", "send", "off"):
            raise ValueError(f"unknown microphone mode {mode!r}")
        if mode == "call":  # a fresh VAD: what an earlier call heard does not leak into this one
            self.listener = await self.loop.run_in_executor(None, self.server.new_listener, VAD_SILENCE_MS)
            self.mic_frames = 0
        if mode == "hold":  # talking over the reply stops it, as in a call
            self.interrupt()
            self.held = []
        if mode == "send" and self.mic_mode == "hold":
            self.ask_spoken(self.held)
        self.mic_mode = mode if mode in ("call", "hold") else "off"

    async def stop_reply(self, message):
        self.interrupt()

    async def reset(self, message):
        self.interrupt()
        if self.turn:
            await asyncio.wait([self.turn])
        self.chat.reset()
        self.send("reset")

    def hear(self, data):
        """One frame of the microphone (16 kHz int16): held while Talk is held, or heard by the call's VAD."""
        frame = self.server.mic_frame
        if len(data) != 2 * frame:
            self.send("error", id=None, message=f"microphone frames are {frame} 16-bit samples, got {len(data)} bytes")
            return
        chunk = np.frombuffer(data, "<i2").astype(np.float32) / PCM16_FULL_SCALE   # (512,)
        if self.mic_mode == "hold":
            self.held.append(chunk)
            if len(self.held) > self.server.max_mic_frames:  # the page sends before
                self.send("error", id=None, message=f"held for {MAX_AUDIO_S} s: that much is sent as the question")
                self.ask_spoken(self.held)
                self.mic_mode = "off"
        elif self.mic_mode == "call":
            self.listen(chunk)

    def listen(self, chunk):
        """VAD on one call frame: speech starting stops the reply at once (barge-in); speech ending asks it."""
        frame, self.mic_frames = self.mic_frames, self.mic_frames + 1
        was_speaking = self.listener.speaking
        self.listener.feed(chunk)
        if self.listener.speaking and not was_speaking:
            self.interrupt()
            self.send("speech_start", frame=frame)
        if self.listener.speaking and len(self.listener.current) > self.server.max_mic_frames:
            self.listener.current = None  # the VAD's "end" of it will find nothing to hand over
            self.send("error", id=None, message=f"you spoke for over {MAX_AUDIO_S} s without a pause: that is not "
                                                "heard; ask in shorter pieces")
        while self.listener.utterances:
            self.ask_spoken([self.listener.utterances.popleft()], frame)

    def ask_spoken(self, chunks, end_frame=None):
        if not chunks:
            self.send("error", id=None, message="nothing was heard")
            return
        wav, turn_id = np.concatenate(chunks), f"spoken-{next(self.spoken)}"
        self.send("speech_end", id=turn_id, frame=end_frame, seconds=round(len(wav) / mo.SAMPLE_RATE_SPEECH, 2))
        self.start(turn_id, lambda stop: self.answer(turn_id, stop, "", None, wav))

    # -- questions: the model answers them in its thread

    def interrupt(self):
        """Stop this tab's reply now (only this tab's): a running one after its next step, a queued one at once."""
        self.stopping.set()
        if self.turn and not self.stopping.running:
            self.turn.cancel()

    def start(self, turn_id, job):
        """A new question: job(stop), in the model's thread once the previous one is stopped and the model is free."""
        self.interrupt()
        self.stopping = stop = TurnStop()
        self.turn = asyncio.create_task(self.question(turn_id, job, stop, self.turn))

    async def question(self, turn_id, job, stop, previous):
        try:
            if previous:
                await asyncio.wait([previous])
            await self.server.use_model(self, turn_id, lambda: job(stop), stop)
        except asyncio.CancelledError:
            self.send("cancelled", id=turn_id)
            raise

    def answer(self, turn_id, stop, text, image, audio):
        self.send("reply_start", id=turn_id)
        reply = self.chat.ask(text, audio, image, interrupt=stop,
                              on_text=lambda piece: self.send("text", id=turn_id, text=piece))
        # Stopped: the model made no more steps from heard_at on; closed: Mimi's thread is done too
        ms = lambda t: round((t - stop.asked_at) * 1000)
        stopped_ms, closed_ms = (ms(stop.heard_at), ms(time.perf_counter())) if reply.interrupted else (None, None)
        heard_s = None if audio is None else round(len(audio) / mo.SAMPLE_RATE_SPEECH, 2)
        self.send("reply_end", id=turn_id, text=reply.text, interrupted=reply.interrupted, steps=reply.steps,
                  frames=reply.frames, seconds=round(reply.seconds, 2), stopped_ms=stopped_ms, closed_ms=closed_ms,
                  image=image is not None, heard_s=heard_s)
        speech = f", {len(reply.pcm) / mo.SAMPLE_RATE_MIMI:.1f} s of speech" if len(reply.pcm) else ""
        first = f", first sound {reply.first_audio_s:.2f} s after the model took the question" \
            if reply.first_audio_s else ""
        stopped = f", stopped {stopped_ms} ms after it was asked to ({closed_ms} ms with Mimi's last decode)" \
            if reply.interrupted else ""
        print(f"tab {self.number}: {reply.steps} steps in {reply.seconds:.1f} s{speech}{first}{stopped}",
              file=sys.stderr)

    def change_voice(self, turn_id, name, clip):
        if clip is None:
            said = self.chat.set_voice(name)
        else:  # set_voice clones from a file: the clip goes to one, which no message names
            clip_name, data = clip
            uploaded_audio(clip, "voice clip")  # an unreadable or long clip is refused under the name the page gave
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / ("clip" + Path(clip_name).suffix[:8])
                path.write_bytes(data)
                try:  # what set_voice says names the clip as the page did
                    said = self.chat.set_voice(str(path)).replace(str(path), clip_name)
                except ValueError as e:
                    raise ValueError(str(e).replace(str(path), clip_name)) from None
        self.send("voice", id=turn_id, message=said)


# -- The server: the page, the tabs, the one model's queue of turns ------------------------------------------

class WebChat:
    """The server: the page, the tabs' WebSockets, and the one model's queue of turns."""

    def __init__(self, chat, args, new_listener, mic_frame):
        """new_listener(silence_ms): a fresh microphone Listener (its own VAD), fed mic_frame samples at a time."""
        self.chat, self.args, self.new_listener, self.mic_frame = chat, args, new_listener, mic_frame
        self.max_mic_frames = MAX_AUDIO_S * mo.SAMPLE_RATE_SPEECH // mic_frame  # a question at most
        self.page = WEB_PAGE.read_bytes()
        self.voices = sorted(chat.released_voices())
        self.tabs, self.opened = set(), itertools.count(1)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.model_free = asyncio.Lock()  # first come, first served
        self.waiting = 0           # turns waiting for the model

    def hello(self, tab):
        voice = self.args.voice if self.args.voice in self.voices else "clone" if self.args.voice else "none"
        return {"tab": tab.number, "voices": self.voices, "voice": voice, "speech": not self.args.no_speech,
                "speech_rate": mo.SAMPLE_RATE_MIMI, "mic_rate": mo.SAMPLE_RATE_SPEECH, "mic_frame": self.mic_frame,
                "silence_ms": VAD_SILENCE_MS,
                "limits": {"upload_mb": MAX_UPLOAD_MB, "audio_s": MAX_AUDIO_S, "text_chars": MAX_TEXT_CHARS}}

    async def use_model(self, tab, turn_id, job, stop):
        """job() in the model's thread once the model is free (first come, first served); its errors go to the
        tab's page. Its stop is marked running from then on: the job can no longer be dropped, only stopped."""
        if self.model_free.locked():
            tab.send("queued", id=turn_id, ahead=self.waiting + 1)
        self.waiting += 1
        try:
            await self.model_free.acquire()
        finally:
            self.waiting -= 1
        try:
            stop.running = True
            await asyncio.get_running_loop().run_in_executor(self.model_thread, job)
        except (FileNotFoundError, ValueError) as e:  # a bad file, a missing part, a prompt too long
            tab.send("error", id=turn_id, message=str(e))
        except Exception as e:  # e.g. Mimi failing mid-reply: the conversation so far is kept
            traceback.print_exc()
            tab.send("error", id=turn_id, message=f"{type(e).__name__}: {e} (the conversation goes on; "
                                                  "Reset starts afresh)")
        finally:
            self.model_free.release()

    async def index(self, request):
        return web.Response(body=self.page, content_type="text/html", charset="utf-8")

    async def connect(self, request):
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] != request.host:  # another site's page, in the user's browser
            raise web.HTTPForbidden(text=f"WebSocket from {origin} refused: only this server's own page may connect")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=WS_HEARTBEAT_S, compress=False)
        await ws.prepare(request)
        if len(self.tabs) >= self.args.max_sessions:
            await ws.send_str(json.dumps({"type": "refused", "message": (
                f"the server already serves {len(self.tabs)} tabs, its limit (--max_sessions "
                f"{self.args.max_sessions}): close another tab, or try again later")}))
            await ws.close()
            return ws
        tab = WebTab(self, ws, next(self.opened))
        self.tabs.add(tab)
        print(f"tab {tab.number} opened ({len(self.tabs)} open)", file=sys.stderr)
        try:
            await tab.run()
        finally:
            self.tabs.discard(tab)
            print(f"tab {tab.number} closed ({len(self.tabs)} open)", file=sys.stderr)
        return ws

    async def serve(self):
        app = web.Application()
        app.add_routes([web.get("/", self.index), web.get("/ws", self.connect)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.args.host, self.args.port, ssl_context=ssl_context(self.args))
            try:
                await site.start()
            except OSError as e:
                raise ValueError(f"cannot serve on --host {self.args.host} --port {self.args.port}: "
                                 f"{e.strerror or e}") from None
            print(*web_banner(self.args, runner.addresses[0][1]), sep="\n", flush=True)
            await asyncio.Event().wait()  # until Ctrl-C
        finally:  # each tab's reply stops as its page is told: no open WebSocket holds up the exit
            await asyncio.gather(*(tab.ws.close(code=WSCloseCode.GOING_AWAY, message=b"the server stopped")
                                   for tab in self.tabs))
            await runner.cleanup()
            await self.model_free.acquire()  # the model's job ends while its tab's loop lives: a reply at its next step


def web_banner(args, port):
    """The lines --web prints once it serves: the address, and what an address beyond this machine means."""
    import socket
    host = socket.gethostname() if args.host in ANY_ADDRESS else f"[{args.host}]" if ":" in args.host else args.host
    lines = [f"MiniMind-O web chat: {'https' if args.ssl_cert else 'http'}://{host}:{port}/  (Ctrl-C stops it)"]
    if args.host not in LOCAL_HOSTS:
        lines.append(f"--host {args.host}: anyone who can reach port {port} of this machine can use this chat and "
                     "its model (there is no login)")
        if not args.ssl_cert:
            lines.append("browsers allow the microphone only on https or localhost: give --ssl_cert/--ssl_key, or "
                         f"reach the page through a tunnel (ssh -L {port}:localhost:{port} ...; see README.md)")
    return lines


def ssl_context(args):
    if not args.ssl_cert:
        return None
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.ssl_cert, args.ssl_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl_cert {args.ssl_cert} / --ssl_key {args.ssl_key}: cannot load them ({e})") from None
    return context


def serve_web(chat, args, new_listener, mic_frame):
    """python chat.py --web: serve the page until Ctrl-C (WebChat says what the arguments are)."""
    asyncio.run(WebChat(chat, args, new_listener, mic_frame).serve())
