"""python chat.py --web, driven in a real headless Chromium: the server runs the demo checkpoint with the
random-weight side modules (conftest.py), the page is chat_web.html. Two microphones feed the page's own
capture path (getUserMedia -> audio worklet -> 512-sample frames over the WebSocket):
- Chromium's fake one, playing a recording (espeak-ng speech): half a second of silence, the question, a pause
  of PAUSE_S, the question again, then silence; for the tests that hold to talk or record a voice;
- a scripted one (`scripted_page`): silence until the test says the question, so that speaking over a reply
  waits for that reply to be heard, however slow the machine is."""
import asyncio
import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import chat
import web
import minimind_o as mo
import files

side_assets = pytest.importorskip("side_assets", reason="tests/side_assets.py builds the side modules")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("the web chat tests need Chromium (Debian: apt-get install -y chromium; .ci/run installs it)",
                allow_module_level=True)
sync_playwright = pytest.importorskip(
    "playwright.sync_api", reason="the web chat tests drive Chromium with playwright (pip install -r "
                                  "requirements.txt)").sync_playwright

REPLY_STEPS = 64          # 56 frames (4.5 s) of speech a reply: long enough to talk over, short to decode
MAX_SESSIONS = 3
PAUSE_S = 0.6             # between the two questions on the fake mic: VAD_SILENCE_MS ends the first
BARGE_IN_LIMIT_MS = 300
HEARD_AHEAD_S = 0.25      # speech is said over a reply with this much of it still to play: longer than the VAD
                          # takes to hear the speech start (the printed vadLagMs, plus the clip's first 50 ms)
BARGE_TRIES = 4           # questions said over a reply until the VAD hears one while it is made and sounds
SERVER_START_S = 180
SERVER_STOP_S = 20        # Ctrl-C to the exit with a tab open mid-reply: most of it is the interpreter's own exit
TURN_TIMEOUT_MS = 60_000
QUESTION = side_assets.HELLO_WAV   # "Hello, how are you today?", 16 kHz
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the server, the browser, and the page's view of a conversation ---------------------------------

def start_server(folder, parts, demo_checkpoint, tokenizer_flag):
    """`python chat.py --web --port 0` in its own process -> (url, process, path of its stderr log)."""
    voices = folder / "voices.pt"
    files.save_voice(voices, "bob", {"ref_codes": torch.zeros(8, 3, dtype=torch.long), "spk_emb": torch.zeros(192)})
    log = folder / "server.log"
    command = [sys.executable, "chat.py", "--web", "--port", "0", "--checkpoint", str(demo_checkpoint),
               *tokenizer_flag, "--mimi", str(parts["mimi"]), "--campplus", str(parts["campplus"]),
               "--sensevoice", str(parts["sensevoice"]), "--siglip", str(parts["siglip"]), "--voices", str(voices),
               "--max_new_tokens", str(REPLY_STEPS), "--seed", "0", "--max_sessions", str(MAX_SESSIONS)]
    with open(log, "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + SERVER_START_S
    line = ""
    while "web chat: http" not in line:
        line = process.stdout.readline()
        if not line and (process.poll() is not None or time.monotonic() > deadline):
            process.kill()
            pytest.fail(f"chat.py --web did not start:\n{log.read_text()}")
    return line.split("web chat: ")[1].split()[0], process, log


@pytest.fixture(scope="module")
def server(tmp_path_factory, parts, demo_checkpoint, tokenizer_flag):
    """The server the tests share: (url, process, path of its stderr log)."""
    url, process, log = start_server(tmp_path_factory.mktemp("web"), parts, demo_checkpoint, tokenizer_flag)
    yield url, process, log
    process.send_signal(signal.SIGINT)  # Ctrl-C: it shuts down cleanly
    assert process.wait(timeout=30) == 0, log.read_text()


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory):
    speech = files.load_audio(str(QUESTION), mo.SAMPLE_RATE_SPEECH)
    silence = lambda s: np.zeros(int(s * mo.SAMPLE_RATE_SPEECH), np.float32)
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    sf.write(path, np.concatenate([silence(0.5), speech, silence(PAUSE_S), speech, silence(3.0)]),
             mo.SAMPLE_RATE_SPEECH, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(fake_mic):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic}%noloop",  # each tab's microphone plays it from the start
            "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


# The scripted microphone: getUserMedia gives the page a stream that is silent until `testMic.say()` plays the
# question into it (16 kHz samples, resampled by the browser like a real microphone's).
SCRIPTED_MIC = """(() => {
  const ctx = new AudioContext(), line = ctx.createMediaStreamDestination();
  window.testMic = {
    clip: null, rate: 0,
    say() {
      const buffer = ctx.createBuffer(1, this.clip.length, this.rate);
      buffer.getChannelData(0).set(this.clip);
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(line);
      source.start();
    },
  };
  navigator.mediaDevices.getUserMedia = async () => { await ctx.resume(); return line.stream; };
})();"""


def open_page(browser, server, init_script=None):
    page = browser.new_page()
    if init_script:
        page.add_init_script(init_script)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(server[0])
    page.wait_for_function("chatState.connected || chatState.refused !== null")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    assert page.errors == []  # no uncaught error in the page's script
    page.close()


def give_scripted_mic(page):
    """The question, for a page opened with SCRIPTED_MIC to say when told."""
    page.evaluate("([clip, rate]) => { testMic.clip = Float32Array.from(clip); testMic.rate = rate; }",
                  [files.load_audio(str(QUESTION), mo.SAMPLE_RATE_SPEECH).tolist(), mo.SAMPLE_RATE_SPEECH])


@pytest.fixture
def scripted_page(browser, server):
    page = open_page(browser, server, SCRIPTED_MIC)
    give_scripted_mic(page)
    yield page
    assert page.errors == []
    page.close()


def say_the_question(page):
    page.evaluate("testMic.say()")


def wait_sounding(page, seconds_ahead):
    """Until the reply being made or played is heard, with at least `seconds_ahead` of it still to play."""
    page.wait_for_function("s => speaker.sources.size > 0 && speaker.next - speaker.ctx.currentTime >= s",
                           arg=seconds_ahead, timeout=TURN_TIMEOUT_MS)


def wait_logged(server, pattern):
    """Until the server's log has a line matching `pattern`: it is written as the server gets to it, which may
    be after the page has moved on."""
    deadline = time.monotonic() + TURN_TIMEOUT_MS / 1000
    while not re.search(pattern, log := server[2].read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"the server never logged {pattern!r}; its log:\n{log}")
        time.sleep(0.1)


def turns(page):
    """The page's record of each turn (chatState.turns, without its DOM nodes), oldest first."""
    return [SimpleNamespace(**t) for t in page.evaluate("""chatState.order.map(id => {
        const {reply, stats, chunks, ...rest} = chatState.turns[id];
        return {...rest, shown: reply.textContent, stats: stats.textContent}; })""")]


def wait_turns(page, n):
    page.wait_for_function("n => chatState.order.filter(id => chatState.turns[id].done).length >= n", arg=n,
                           timeout=TURN_TIMEOUT_MS)
    return turns(page)


def wait_last(page):
    """The latest turn, once it is over."""
    page.wait_for_function("chatState.order.length && chatState.turns[chatState.order.at(-1)].done",
                           timeout=TURN_TIMEOUT_MS)
    return turns(page)[-1]


def wait_notice(page, text):
    from playwright.sync_api import TimeoutError as Timeout
    try:
        page.wait_for_function("s => (chatState.notices || []).some(n => n.includes(s))", arg=text,
                               timeout=TURN_TIMEOUT_MS)
    except Timeout:
        pytest.fail(f"the page never said {text!r}; it said {page.evaluate('chatState.notices')}")


def questions_seconds(page):
    """How long each spoken question was, as the page shows it: '(spoken, 1.9 s)'."""
    shown = page.evaluate("[...document.querySelectorAll('.you')].map(e => e.textContent)")
    return [float(re.fullmatch(r"\(spoken, ([\d.]+) s\)", s).group(1)) for s in shown if s.startswith("(spoken")]


def ask(page, text):
    page.fill("#text", text)
    page.click("#send")


def spoke_all(turn):
    """The reply ran to its end and every frame it made was played (else an AssertionError that shows it)."""
    assert turn.outcome == "answered" and not turn.interrupted, turn
    assert turn.frames == REPLY_STEPS - mo.N_CODEBOOKS and turn.samples == turn.frames * mo.MIMI_FRAME_SAMPLES, turn
    return True


# -- the tests -------------------------------------------------------------------------------------

def test_a_typed_question_streams_its_text_and_plays_its_speech_as_it_is_made(page):
    ask(page, "1+1=")
    [turn] = wait_turns(page, 1)
    assert spoke_all(turn) and turn.dropped == 0
    reply_time = turn.endedAt - turn.startedAt
    assert len(turn.textPieces) > 1 and turn.endedAt - turn.textPieces[0] > 0.3 * reply_time  # text streamed
    assert turn.questionEnd < turn.firstSoundAt < turn.endedAt            # speech began before the reply ended
    assert turn.firstSoundMs > 0 and "first sound" in turn.stats and turn.shown == turn.text
    wav_bytes = page.evaluate("url => fetch(url).then(r => r.arrayBuffer()).then(b => b.byteLength)", turn.wavUrl)
    assert wav_bytes == 44 + 2 * turn.samples                               # the reply's wav, to download
    page.wait_for_function("speaker.sources.size === 0", timeout=TURN_TIMEOUT_MS)  # it played to the end
    page.click("#reset")
    wait_notice(page, "the conversation is forgotten")
    assert page.locator("#log").inner_text() == ""


def test_a_spoken_question_is_answered_and_speaking_over_the_reply_being_made_stops_it_at_once(scripted_page):
    page = scripted_page
    page.click("#call")
    say_the_question(page)
    page.wait_for_function("chatState.replying !== null", timeout=TURN_TIMEOUT_MS)
    say_the_question(page)  # again, while the reply is being made: the VAD hears it start, the model stops
    first, second = wait_turns(page, 2)
    assert first.interrupted and first.steps < REPLY_STEPS, first
    # from the VAD's "start" to the model's last step: at once is within BARGE_IN_LIMIT_MS, or on a machine so
    # busy that a model step takes longer, within two steps (the stop is heard between steps)
    step_ms = 1000 * second.seconds / second.steps
    assert first.stoppedMs < max(BARGE_IN_LIMIT_MS, 2 * step_ms), (first.stoppedMs, step_ms)
    print(f"barge-in: the model stopped {first.stoppedMs} ms after the VAD heard speech, {first.closedMs} ms with "
          f"Mimi's last decode; the VAD was {first.barge['vadLagMs']} ms behind the microphone")
    # ... and that question, heard from its first word, gets the whole reply
    assert spoke_all(second) and second.firstSoundMs > 0
    # the page shows seconds to one decimal: a whole clip of 1.91 s may show as 1.9
    assert min(questions_seconds(page)) >= sf.info(str(QUESTION)).duration - 0.05
    page.click("#call")  # hang up


def test_speaking_over_the_reply_being_heard_silences_it_at_once(scripted_page):
    page = scripted_page
    page.click("#call")
    say_the_question(page)
    # The question is said while the reply sounds, with HEARD_AHEAD_S of it still to play; on a busy machine the
    # VAD may hear it only after the reply was all made, or its last sound ended, or in a gap while frames were
    # late. Such a try proves nothing either way: the question just said gets its own reply, and the next try
    # speaks over that one.
    for tries in range(1, BARGE_TRIES + 1):
        wait_sounding(page, HEARD_AHEAD_S)
        say_the_question(page)
        page.wait_for_function("n => chatState.barges.length > n", arg=tries, timeout=TURN_TIMEOUT_MS)
        barge = page.evaluate("chatState.barges.at(-1)")  # (the first question's start came before any reply)
        if barge["sounding"] > 0 and barge["turn"] is not None:
            break
    assert barge["sounding"] > 0 and barge["turn"] is not None, \
        f"in {BARGE_TRIES} tries the VAD never heard the question while a reply was being made and sounded"
    assert barge["soundingAfter"] == 0                                # what played stopped at once ...
    *_, last = wait_turns(page, tries + 1)
    [cut] = [t for t in turns(page) if t.id == barge["turn"]]
    assert cut.samples == barge["playedSamples"]                      # ... and nothing of that reply played after
    assert spoke_all(last)
    print(f"the VAD heard the question over a sounding reply at try {tries}")
    page.click("#call")


def test_hold_to_talk_asks_what_was_said(page):
    talk = page.locator("#talk").bounding_box()
    page.mouse.move(talk["x"] + 5, talk["y"] + 5)
    page.mouse.down()
    page.wait_for_timeout(2600)  # the fake mic: 0.5 s of silence, then the question
    page.mouse.up()
    [turn] = wait_turns(page, 1)
    assert spoke_all(turn)
    [seconds] = questions_seconds(page)
    assert 1.5 < turn.heardSeconds < 2.7  # what was held, less the mic's start and the frames still on their way
    assert seconds == pytest.approx(turn.heardSeconds, abs=0.05)  # as the page shows it: one decimal


def test_a_voice_recorded_in_the_page_is_cloned(page):
    page.click("#clone-record")  # 5 s of the fake mic: the question, then part of it again
    wait_notice(page, "voice: cloned from recorded voice.wav")
    assert page.locator("#voice").input_value() == "clone"


def test_an_image_and_a_cloned_voice(page, tmp_path):
    from PIL import Image
    picture = tmp_path / "red.png"
    Image.new("RGB", (48, 32), (220, 30, 30)).save(picture)
    page.set_input_files("#clone-file", str(QUESTION))
    wait_notice(page, f"voice: cloned from {QUESTION.name} (")
    page.set_input_files("#image-file", str(picture))
    ask(page, "What is in this picture?")
    [turn] = wait_turns(page, 1)
    assert spoke_all(turn) and turn.withImage and page.locator(".you img").count() == 1
    page.select_option("#voice", "bob")  # a voice from --voices
    wait_notice(page, "voice: bob")
    ask(page, "And now?")
    assert spoke_all(wait_turns(page, 2)[1])


def test_bad_uploads_and_messages_are_refused_with_a_message_and_the_server_goes_on(page, server, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    page.set_input_files("#image-file", str(not_image))
    ask(page, "What is this?")
    wait_notice(page, "notes.png is not an image that can be read")

    picture = tmp_path / "tiny.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(picture)
    page.set_input_files("#audio-file", str(picture))
    page.click("#send")
    wait_notice(page, "tiny.png: cannot decode audio")

    long_audio = tmp_path / "long.wav"
    sf.write(long_audio, np.tile(files.load_audio(str(QUESTION), mo.SAMPLE_RATE_SPEECH), 20), mo.SAMPLE_RATE_SPEECH)
    page.set_input_files("#audio-file", str(long_audio))
    page.click("#send")
    wait_notice(page, f"at most {web.MAX_AUDIO_S} s of audio is heard")

    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, files.load_audio(str(QUESTION), mo.SAMPLE_RATE_SPEECH) * 1e-3, mo.SAMPLE_RATE_SPEECH)
    page.set_input_files("#clone-file", str(quiet))
    wait_notice(page, "voice clip quiet.wav is too quiet")

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (web.MAX_UPLOAD_MB * 2 ** 20 + 1))
    page.set_input_files("#image-file", str(big))
    wait_notice(page, f"big.png is 10.0 MB: at most {web.MAX_UPLOAD_MB} MB")  # said by the page: never sent

    ask(page, "x" * (web.MAX_TEXT_CHARS + 1))
    wait_notice(page, f"at most {web.MAX_TEXT_CHARS}")
    # what the page would not send, the server refuses too
    oversized = base64.b64encode(b"\0" * (web.MAX_UPLOAD_MB * 2 ** 20 + 1)).decode()
    page.evaluate("data => send({type: 'ask', id: 'raw', text: '', image: {name: 'raw.png', data}})", oversized)
    wait_notice(page, f"image raw.png is 10.0 MB: at most {web.MAX_UPLOAD_MB} MB")
    page.evaluate("send('hello?')")
    wait_notice(page, "not a message this server knows")
    page.evaluate("ws.send(new Uint8Array(3).buffer)")
    wait_notice(page, "microphone frames are 512 16-bit samples")

    ask(page, "1+1=")  # the same tab and the server go on
    assert spoke_all(wait_last(page))
    assert server[1].poll() is None


def test_a_tab_clones_one_voice_at_a_time(page):
    """Each waiting clip is held in memory: a tab may not queue them. The second is refused before it is decoded."""
    ask(page, "1+1=")
    page.wait_for_function("chatState.replying !== null", timeout=TURN_TIMEOUT_MS)  # the clone waits for it
    page.set_input_files("#clone-file", str(QUESTION))
    page.wait_for_function("Object.keys(chatState.voiceRequests).length > 0")  # sent
    page.evaluate("send({type: 'voice', id: 'second', clip: {name: 'second.wav', data: 'not base64'}})")
    wait_notice(page, "a voice is already being set for this tab")
    wait_notice(page, f"voice: cloned from {QUESTION.name} (")
    assert spoke_all(wait_last(page))
    page.select_option("#voice", "bob")  # the first clone is done: the tab may change its voice again
    wait_notice(page, "voice: bob")


def test_two_tabs_at_once_both_get_answers_and_one_tabs_barge_in_leaves_the_others_reply(browser, server):
    first, second = open_page(browser, server), open_page(browser, server, SCRIPTED_MIC)
    try:
        ask(first, "1+1=")
        first.wait_for_function("chatState.replying !== null", timeout=TURN_TIMEOUT_MS)
        ask(second, "2+2=")  # while the first tab's reply is being made: it waits its turn, and is told so
        assert spoke_all(wait_turns(first, 1)[0])
        waited = wait_turns(second, 1)[0]
        assert spoke_all(waited) and waited.queuedBehind == 1
        ask(first, "3+3=")
        first.wait_for_function("chatState.replying !== null", timeout=TURN_TIMEOUT_MS)
        give_scripted_mic(second)
        second.click("#call")
        say_the_question(second)   # the second tab speaks during the first tab's reply
        reply = wait_turns(first, 2)[1]
        assert spoke_all(reply)   # not stopped by the other tab's barge-in ...
        heard = second.evaluate("performance.timeOrigin + chatState.speechStarts[0]")
        started, ended = (first.evaluate("performance.timeOrigin") + t for t in (reply.startedAt, reply.endedAt))
        assert started < heard < ended   # ... which came while it was being made
        second.wait_for_function("chatState.order.some(id => id.startsWith('spoken') && "
                                 "chatState.turns[id].outcome === 'answered')", timeout=TURN_TIMEOUT_MS)
        second.click("#call")
    finally:
        first.close()
        second.close()


def test_a_tab_over_the_limit_is_told_so_and_a_closed_tab_frees_its_place(browser, server):
    pages = [open_page(browser, server) for _ in range(MAX_SESSIONS)]
    extra = open_page(browser, server)
    try:
        assert extra.evaluate("chatState.refused").startswith(f"the server already serves {MAX_SESSIONS} tabs")
        assert "already serves" in extra.locator("#notice").inner_text()
        closed = pages[0].evaluate("chatState.hello.tab")
        ask(pages[0], "1+1=")
        pages[0].wait_for_function("chatState.replying !== null", timeout=TURN_TIMEOUT_MS)
        pages[0].close()   # mid-reply: the reply stops, the place is free
        extra.reload()
        extra.wait_for_function("chatState.connected")
        ask(extra, "2+2=")
        assert spoke_all(wait_turns(extra, 1)[0])
        wait_logged(server, rf"tab {closed} closed")
        wait_logged(server, rf"tab {closed}: \d+ steps .* stopped \d+ ms after")
    finally:
        for p in pages[1:] + [extra]:
            p.close()


def test_another_sites_page_cannot_connect(server):
    """WebSockets are not bound by the same-origin rule: any page in the user's browser could otherwise talk
    to the model on localhost."""
    def handshake(origin):
        address = urllib.parse.urlparse(server[0])
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        connection.request("GET", "/ws", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Origin": origin})
        status = connection.getresponse().status
        connection.close()
        return status
    assert handshake("http://evil.example") == 403
    assert handshake(server[0].rstrip("/")) == 101  # the page's own origin


def test_web_arguments_and_what_a_public_host_means(tmp_path, capsys):
    for extra, message in [(["--text", "hi"], "--web serves the chat as a page"),
                           (["--ssl_cert", "cert.pem"], "--ssl_cert and --ssl_key go together"),
                           (["--port", "70000"], "argument --port: 70000 is not a port, 0 to 65535")]:
        with pytest.raises(SystemExit):
            chat.parse_args(["--web", *extra])
        assert message in capsys.readouterr().err
    local = web.web_banner(chat.parse_args(["--web"]), 8000)
    assert local == ["MiniMind-O web chat: http://127.0.0.1:8000/  (Ctrl-C stops it)"]
    public = "\n".join(web.web_banner(chat.parse_args(["--web", "--host", "0.0.0.0"]), 8000))
    assert "anyone who can reach port 8000" in public and "ssh -L 8000:localhost:8000" in public


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes a self-signed certificate with openssl")
def test_https_certificates_are_loaded_or_named(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days",
                    "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    assert web.ssl_context(chat.parse_args(["--web", "--ssl_cert", str(cert), "--ssl_key", str(key)])) is not None
    with pytest.raises(ValueError, match="cannot load them"):
        web.ssl_context(chat.parse_args(["--web", "--ssl_cert", str(key), "--ssl_key", str(cert)]))


def test_each_tab_has_its_own_conversation_on_the_shared_model(demo_checkpoint, tokenizer_flag):
    base = chat.Chat(chat.parse_args(["--checkpoint", str(demo_checkpoint), *tokenizer_flag, "--no_speech",
                                      "--max_new_tokens", "4"]))
    first, second = base.conversation(), base.conversation()
    first.ask("What is 1 plus 1?")
    assert len(first.history) == 2 and second.history == [] and base.history == []
    assert first.model is second.model is base.model and first.parts is second.parts is base.parts


class Socket:
    """A tab's WebSocket, for a WebTab without a browser: iterating it waits until `close`; what is sent is lost."""
    def __init__(self):
        self.closed = asyncio.Event()

    async def send_str(self, text):
        pass

    def close(self):
        self.closed.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        await self.closed.wait()
        raise StopAsyncIteration


def test_a_closed_tabs_waiting_voice_change_never_holds_the_model():
    """A tab that closes while its voice change waits for the model drops it, as it drops a waiting question."""
    voices_set = []
    conversation = SimpleNamespace(set_voice=lambda name: voices_set.append(name) or f"voice: {name}")
    model = SimpleNamespace(conversation=lambda player: conversation, released_voices=lambda: {"bob": None})

    async def close_while_waiting():
        server = web.WebChat(model, chat.parse_args(["--web"]), None, 512)
        socket, busy = Socket(), threading.Event()
        tab = web.WebTab(server, socket, 1)
        served = asyncio.create_task(tab.run())
        other = asyncio.create_task(server.use_model(tab, "other", lambda: busy.wait(TURN_TIMEOUT_MS / 1000),
                                                       web.TurnStop()))
        await tab.on_message(json.dumps({"type": "voice", "id": "v", "name": "bob"}))
        await asyncio.sleep(0)  # each starts: the other turn has the model, the voice change waits for it
        assert server.waiting == 1
        socket.close()
        await served
        busy.set()
        await other
        await asyncio.wait([tab.voice_change])
        return tab.voice_change.cancelled()
    with ThreadPoolExecutor(1) as thread:  # not in this one: playwright's event loop runs in it
        assert thread.submit(asyncio.run, close_while_waiting()).result() and voices_set == []


def test_ctrl_c_with_a_tab_open_mid_reply_stops_the_server_at_once(browser, tmp_path, parts, demo_checkpoint,
                                                                    tokenizer_flag):
    """Each tab's reply stops and its WebSocket closes: aiohttp's shutdown has no open connection to wait for."""
    server = start_server(tmp_path, parts, demo_checkpoint, tokenizer_flag)
    page = open_page(browser, server)
    try:
        ask(page, "1+1=")
        page.wait_for_function("chatState.replying !== null", timeout=TURN_TIMEOUT_MS)
        server[1].send_signal(signal.SIGINT)
        assert server[1].wait(timeout=SERVER_STOP_S) == 0
        log = server[2].read_text()
        assert "Traceback" not in log and re.search(r"tab 1: \d+ steps .* stopped \d+ ms after", log), log
        wait_notice(page, "the connection closed: the server stopped")
        assert page.errors == []
    finally:
        server[1].kill()
        page.close()
