"""Streaming generation (section 11): what arrives when, the sampling rules, and the decode shortcuts."""
import sys
from pathlib import Path

import pytest
import torch

import minimind_o as mo
from conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_generate  # noqa: E402

PROMPT = torch.arange(100, 120)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mo.MiniMindO(tiny_config()).eval()


def never_stop_speaking(model):
    """A copy whose codec head gives the specials (pad, stop, slot) logit 0: with random weights the
    top codes are positive, so no layer ever stops and every step after the 8th completes a frame."""
    copy = mo.MiniMindO(model.config).eval()
    copy.load_state_dict(model.state_dict())
    head = copy.talker.lm_head
    with torch.no_grad():
        for linear in [head.base] + [adapter[2] for adapter in head.adapters]:
            linear.weight[mo.CODEBOOK_SIZE:] = 0
    return copy


def test_text_streams_from_the_first_step_and_each_frame_as_soon_as_it_is_complete(model):
    steps = list(mo.stream_generate(never_stop_speaking(model), PROMPT, max_new_tokens=20, greedy=True))
    assert len(steps) == 20 and all(s.text is not None or i > 0 for i, s in enumerate(steps))
    # layer i starts i + 1 steps into the reply, so frame 0 is complete at step 8, then one per step
    assert [s.frame is not None for s in steps] == [False] * 8 + [True] * 12
    assert all(len(s.frame) == mo.N_CODEBOOKS and max(s.frame) < mo.CODEBOOK_SIZE for s in steps[8:])


def test_generate_collects_the_stream(model):
    torch.manual_seed(1)
    steps = list(mo.stream_generate(model, PROMPT, max_new_tokens=16))
    torch.manual_seed(1)
    text, frames = mo.generate(model, PROMPT, max_new_tokens=16)
    assert text == [s.text for s in steps if s.text is not None]
    assert frames == [s.frame for s in steps if s.frame is not None]


def test_a_seed_repeats_a_sampled_reply_and_greedy_needs_none(model):
    runs, speaking = [], never_stop_speaking(model)
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(mo.generate(speaking, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.95))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0] and runs[0][1] != runs[2][1]      # it does sample: another seed, another reply
    greedy = mo.generate(model, PROMPT, 10, greedy=True)
    torch.manual_seed(0)
    assert mo.generate(model, PROMPT, 10, greedy=True) == greedy
    # a near-zero temperature leaves the text no choice: sampling it gives the greedy text
    torch.manual_seed(3)
    assert mo.generate(model, PROMPT, 10, temperature=1e-6, top_p=1.0)[0] == greedy[0]


def test_audio_sampling_keeps_to_the_top_50_and_penalises_recent_codes():
    torch.manual_seed(0)
    logits = torch.randn(mo.N_CODEBOOKS, 2112)
    allowed = logits.topk(mo.AUDIO_TOP_K, dim=-1).indices
    for _ in range(20):
        codes = mo.sample_audio(logits, torch.empty(mo.N_CODEBOOKS, 0, dtype=torch.long), greedy=False)
        assert (allowed == codes[:, None]).any(-1).all()
    best = logits.argmax(-1, keepdim=True)
    # the penalty applies once per recent occurrence: repeated enough, the best code loses to the second
    runner_up = logits.topk(2, dim=-1).values
    times = int(torch.log(runner_up[:, :1] / runner_up[:, 1:]).max() / torch.log(torch.tensor(mo.AUDIO_PENALTY))) + 2
    assert (mo.sample_audio(logits, best.repeat(1, times), greedy=True) != best[:, 0]).all()


def test_text_sampling_top_p_and_repetition_penalty():
    logits = torch.tensor([4.0, 3.0, -1.0, 0.5])
    seen = torch.tensor([True, False, True, False])
    # penalty 2: positive logits halve (4 -> 2 < 3), negative ones double
    assert mo.sample_text(logits, seen, 1.0, 1.0, 2.0, greedy=True) == 1
    torch.manual_seed(0)
    picks = {int(mo.sample_text(logits, seen * False, 1.0, 0.5, 1.0, greedy=False)) for _ in range(50)}
    assert picks == {0}  # token 0 alone holds more than half the probability


def test_the_penalty_divides_positive_logits_and_multiplies_negative_ones():
    assert mo.penalized(torch.tensor([2.0, -2.0, 0.0]), 2.0).tolist() == [1.0, -4.0, 0.0]
    # every logit negative: the seen token's -1 becomes -2 (not -0.5), so the unseen -1.5 wins
    logits, seen = torch.tensor([-1.0, -1.5, -3.0]), torch.tensor([True, False, False])
    assert mo.sample_text(logits, seen, 1.0, 1.0, 2.0, greedy=True) == 1
    assert mo.sample_text(logits, seen, 1.0, 1.0, 1.0, greedy=True) == 0
    # audio: the last code emitted, best by a hair below zero (-0.5 after the temperature), is pushed to
    # -0.525 by the 1.05 penalty and loses to the runner-up (-0.51)
    logits = torch.full((mo.N_CODEBOOKS, mo.AUDIO_VOCAB), -1.0)
    logits[:, 5], logits[:, 6] = -0.100, -0.102
    recent = torch.full((mo.N_CODEBOOKS, 1), 5)
    assert (mo.sample_audio(logits, recent, greedy=True) == 6).all()
    assert (mo.sample_audio(logits, recent[:, :0], greedy=True) == 5).all()


def test_voice_prompt_and_encoder_features_go_in_at_prefill_only(model, monkeypatch):
    calls = []
    for name in ("prefill", "step", "speech_step"):
        def record(*args, _name=name, _method=getattr(model, name), **kwargs):
            calls.append((_name, args))
            return _method(*args, **kwargs)
        monkeypatch.setattr(model, name, record)
    ref, spk = torch.randint(0, mo.CODEBOOK_SIZE, (8, 5)), torch.randn(192)
    speech, image = [torch.randn(4, 512)], [torch.randn(64, 768)]
    mo.generate(model, PROMPT, 3, greedy=True, ref_codes=ref, spk_emb=spk, audio_embeds=speech, image_embeds=image)
    (first, (prompt, first_spk, audio_embeds, image_embeds)), later = calls[0], calls[1:]
    assert first == "prefill" and [name for name, _ in later] == ["step", "step"]
    assert torch.equal(prompt[0, :8, -5:], ref)                          # reference codes end the prompt
    assert (prompt[0, :8, -6] == mo.SPEAKER_SLOT).all() and (prompt[0, :8, :-6] == mo.AUDIO_PAD).all()
    assert torch.equal(first_spk[0], spk) and all(torch.equal(args[2][0], spk) for _, args in later)
    assert audio_embeds is speech and image_embeds is image
    assert [args[1].tolist() for _, args in later] == [[len(PROMPT)], [len(PROMPT) + 1]]  # one position per step


def test_a_reply_that_cannot_fit_the_positions_is_refused_up_front(model):
    positions = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"at most {positions} positions"):
        mo.generate(model, torch.ones(positions - 4, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="at least one new token"):
        mo.generate(model, torch.ones(3, dtype=torch.long), max_new_tokens=0)


# ---- the delay schedule of spec section 4, step by step, with a scripted model --------------------

SCRIPT_TEXT = [100, 101, 102, 103, 104, mo.IM_END]   # the text it says: five tokens, then EOS at step 5
SCRIPT_FRAMES = 4                                    # each layer: 4 codes once it starts, then its stop id


def scripted_code(n, i):
    """The code layer i's logits favour at step n: different for every step and layer."""
    return (100 * i + 7 * n + 1) % mo.CODEBOOK_SIZE


def scripted_audio_id(n, i):
    """What the scripted talker head favours for layer i at step n: codes from its first step on
    (step i + 1), its stop id after SCRIPT_FRAMES of them, then codes again (which must not make frames)."""
    return mo.AUDIO_STOP if n == i + 1 + SCRIPT_FRAMES else scripted_code(n, i)


def script(model):
    """Forward hooks on the fixed official heads replace their logits so that greedy decoding picks the
    scripted ids; pre-hooks on the embeddings record what each model call was fed. Returns (fed, undo)."""
    calls = {"text": 0, "audio": 0}
    fed = {"text": [], "codes": []}

    def text_head(module, args, out):
        k = calls["text"]
        calls["text"] += 1
        logits = torch.full_like(out, -5.0)
        logits[..., SCRIPT_TEXT[k] if k < len(SCRIPT_TEXT) else mo.TEXT_PAD] = 5.0
        return logits

    def audio_head(module, args, out):                     # out: (1, 8, 2112), one step's last position
        n = calls["audio"]
        calls["audio"] += 1
        logits = torch.full_like(out, -5.0)
        for i in range(mo.N_CODEBOOKS):
            logits[:, i, ..., scripted_audio_id(n, i)] = 5.0
        return logits

    hooks = [model.lm_head.register_forward_hook(text_head),
             model.talker.lm_head.register_forward_hook(audio_head),
             model.thinker.embed_tokens.register_forward_pre_hook(lambda m, a: fed["text"].append(a[0][0].tolist())),
             model.talker.embed_tokens.register_forward_pre_hook(lambda m, a: fed["codes"].append(a[0][0].tolist()))]
    return fed, lambda: [h.remove() for h in hooks]


def expected_emitted(n, i):
    """Spec section 4: with a = n - 1, layer i emits the pad while a < i, otherwise what its logits say."""
    return mo.AUDIO_PAD if n - 1 < i else scripted_audio_id(n, i)


def test_scripted_generation_follows_the_delay_schedule(model):
    fed, undo = script(model)
    try:
        steps = list(mo.stream_generate(model, PROMPT, max_new_tokens=30, greedy=True))
    finally:
        undo()
    last_stop = mo.N_CODEBOOKS + SCRIPT_FRAMES      # layer 7 starts at step 8, stops at step 12: the end
    assert len(steps) == last_stop                  # steps 0..11 are yielded; step 12 only finds that all stopped
    assert [s.text for s in steps] == SCRIPT_TEXT + [None] * (last_stop - len(SCRIPT_TEXT))

    # the prefill reads the prompt with pads in every audio row; each later call reads the previous step's column
    assert fed["text"][0] == PROMPT.tolist() and len(fed["codes"]) == last_stop + 1
    assert all(row == [mo.AUDIO_PAD] * len(PROMPT) for row in fed["codes"][0])
    for n in range(1, last_stop + 1):
        column = [row[-1] for row in fed["codes"][n]]
        assert column == [expected_emitted(n - 1, i) for i in range(mo.N_CODEBOOKS)], f"codes fed at step {n}"
    assert fed["codes"][2] == [[c] for c in [scripted_code(1, 0)] + [mo.AUDIO_PAD] * 7]   # layer 0 alone has begun
    # text fed back: the reply, its EOS, then a newline, then padding
    text_fed = [row[-1] for row in fed["text"][1:]]
    assert text_fed == SCRIPT_TEXT + [mo.NEWLINE] + [mo.TEXT_PAD] * (last_stop - len(SCRIPT_TEXT) - 1)

    # frame f is complete at step f + 8 (layer i spoke its code f at step f + 1 + i); none after a stop
    frames = [[scripted_code(f + 1 + i, i) for i in range(mo.N_CODEBOOKS)] for f in range(SCRIPT_FRAMES)]
    assert [s.frame for s in steps] == [None] * mo.N_CODEBOOKS + frames


def test_scripted_generation_stops_at_max_new_tokens(model):
    fed, undo = script(model)
    try:
        text, frames = mo.generate(model, PROMPT, max_new_tokens=10, greedy=True)
    finally:
        undo()
    assert text == SCRIPT_TEXT and len(frames) == 2 and len(fed["codes"]) == 10   # frames of steps 8 and 9


def test_moe_generation_with_the_cache_equals_recomputing_everything():
    """Greedy decoding of a MoE model (KV cache, one column a step) gives, at every step, the logits of one
    forward pass over everything it was fed."""
    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config(use_moe=True)).eval()
    logits, fed = {"text": [], "audio": []}, {"text": [], "codes": []}
    # a decode step computes the heads on its last position only: text (1, vocab), audio (1, 8, audio_vocab)
    hooks = [model.lm_head.register_forward_hook(lambda m, a, out: logits["text"].append(out[0])),
             model.talker.lm_head.register_forward_hook(lambda m, a, out: logits["audio"].append(out[0])),
             model.thinker.embed_tokens.register_forward_pre_hook(lambda m, a: fed["text"].append(a[0])),
             model.talker.embed_tokens.register_forward_pre_hook(lambda m, a: fed["codes"].append(a[0]))]
    ref, spk = torch.randint(0, mo.CODEBOOK_SIZE, (8, 4)), torch.randn(192)
    try:
        text, _ = mo.generate(model, PROMPT, max_new_tokens=14, greedy=True, ref_codes=ref, spk_emb=spk)
    finally:
        for h in hooks:
            h.remove()
    ids = torch.cat([torch.cat([c, t[:, None]], 1) for c, t in zip(fed["codes"], fed["text"])], -1)   # (1, 9, P + 13)
    with torch.no_grad():
        full = model(ids, spk_emb=spk[None])
    P = len(PROMPT)
    steps = len(logits["audio"])
    torch.testing.assert_close(torch.stack(logits["audio"]), full.audio_logits[0, :, P - 1:P - 1 + steps].transpose(0, 1),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(logits["text"]), full.text_logits[0, P - 1:P - 1 + len(logits["text"])],
                               atol=1e-4, rtol=1e-4)
    assert text == full.text_logits[0, P - 1:P - 1 + len(text)].argmax(-1).tolist()


def test_compiled_decode_steps_trace_whole_compile_once_and_decode_as_eager(model):
    """bench_generate.py --compile (CUDA graphs on a GPU): step and speech_step trace without a graph break
    (fullgraph), compile once however many steps and replies follow, and give the eager greedy reply.
    Dynamo's tracing and guards only (backend "eager"): inductor's C++ build takes minutes here."""
    greedy = dict(max_new_tokens=20, greedy=True, repetition_penalty=1.5)  # the penalty: not one token repeated
    text = mo.generate(model, PROMPT, **greedy)[0]
    eos = next(t for k, t in enumerate(text) if k >= 3 and t not in text[:k])  # ends the text early: speech_step runs
    expected = mo.generate(model, PROMPT, eos_token_id=eos, **greedy)
    assert len(expected[0]) < 20 and expected[1]
    compiled = mo.MiniMindO(model.config).eval()
    compiled.load_state_dict(model.state_dict())
    bench_generate.compile_decode(compiled, backend="eager")
    before = bench_generate.graphs_compiled()
    assert [mo.generate(compiled, PROMPT, eos_token_id=eos, **greedy) for _ in range(2)] == [expected] * 2
    assert bench_generate.graphs_compiled() - before == 2   # step and speech_step, once each
