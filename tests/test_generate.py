"""Streaming generation (section 11): what arrives when, the sampling rules, and the decode shortcuts."""
import pytest
import torch

import minimind_o as mo
from conftest import tiny_config

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
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(mo.generate(model, PROMPT, max_new_tokens=12, temperature=1.0, top_p=0.95))
    assert runs[0] == runs[1]
    assert mo.generate(model, PROMPT, 12, greedy=True) == mo.generate(model, PROMPT, 12, greedy=True)


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
