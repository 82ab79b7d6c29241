"""The nine-row sample: layout, voice prompt, delays, labels, and the training-time variations."""
import random

import pytest
import torch

import minimind_o as mo
import data

CONV = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]


def codes(frames, offset=0):
    return [(offset + 8 * f + i) % 2048 for f in range(frames) for i in range(8)]


def test_answer_layers_are_delayed_and_end_with_stop(tokenizer):
    ids, text_labels, audio_labels = mo.build_sample(CONV, tokenizer, 128, answer_codes=codes(5) + [7, 7, 7])
    assert ids.shape == (9, 127) and text_labels.shape == (127,) and audio_labels.shape == (8, 127)
    text = ids[mo.TEXT_ROW].tolist()
    think_end = mo.encode(tokenizer, mo.THINK_END)
    assert mo.find(text, think_end) < 0       # keep_empty_think=False deletes the empty think block
    head = mo.encode(tokenizer, "<|im_start|>assistant\n")
    reply = mo.find(text, head) + len(head)      # s: the reply's first token
    for i in range(8):
        row = ids[i].tolist()
        first = reply + 1 + i                    # layer i starts i + 1 steps after the reply
        assert row[first:first + 6] == [8 * f + i for f in range(5)] + [mo.AUDIO_STOP]   # partial frame dropped
        assert set(row[:first]) == {mo.AUDIO_PAD} and set(row[first + 6:]) == {mo.AUDIO_PAD}
        assert audio_labels[i, first - 1:first + 5].tolist() == row[first:first + 6]     # labels: the next column


def test_voice_prompt_right_aligned_with_speaker_slot():
    ref = torch.arange(8 * 4).view(4, 8).T          # (8, 4) frames
    rows = mo.voice_prompt_rows(10, ref, has_speaker=True)
    assert torch.equal(rows[:, 6:], ref) and (rows[:, 5] == mo.SPEAKER_SLOT).all() and (rows[:, :5] == mo.AUDIO_PAD).all()
    long = mo.voice_prompt_rows(3, ref, has_speaker=True)          # too long: keep the latest, slot at 0
    assert torch.equal(long[:, 1:], ref[:, -2:]) and (long[:, 0] == mo.SPEAKER_SLOT).all()
    assert torch.equal(mo.voice_prompt_rows(3, ref), ref[:, -3:])  # no speaker: position 0 is usable
    only_slot = mo.voice_prompt_rows(4, None, has_speaker=True)
    assert (only_slot[:, 3] == mo.SPEAKER_SLOT).all() and (only_slot[:, :3] == mo.AUDIO_PAD).all()
    flat = mo.voice_prompt_rows(10, ref.T.flatten().tolist(), has_speaker=True)   # flattened frame-major
    assert torch.equal(flat, rows)


def test_truncated_sample_keeps_shapes(tokenizer):
    long_conv = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "answer " * 50}]
    ids, tl, al = mo.build_sample(long_conv, tokenizer, 64, answer_codes=codes(30), ref_codes=codes(10), has_spk=True)
    assert ids.shape == (9, 63) and (al == mo.IGNORE).all()   # the reply never started within 64 tokens


def test_unknown_role_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        mo.build_sample([{"role": "robot", "content": "hi"}], tokenizer, 32)


def test_audio_and_image_layouts(tokenizer):
    conv = [{"role": "user", "content": "<image>Describe it."}, {"role": "assistant", "content": "A cat."}]
    ids, _, _ = mo.build_sample(conv, tokenizer, 256, has_image=True, n_audio_tokens=5, audio_layout="audio_blankline_text",
                                image_layout="image_newline_text")
    text = ids[mo.TEXT_ROW].tolist()
    assert text.count(mo.IMAGE_PLACEHOLDER) == mo.IMAGE_TOKENS and text.count(mo.AUDIO_PLACEHOLDER) == 5
    # The release places the audio first, then moves <image> in front of the whole question.
    assert text.index(mo.IMAGE_PLACEHOLDER) < text.index(mo.AUDIO_PLACEHOLDER) < text.index(mo.encode(tokenizer, "Describe")[0])


def test_draw_variations_follows_published_probabilities():
    rng = random.Random(0)
    draws = [data.draw_variations(rng) for _ in range(4000)]
    share = lambda key, value: sum(d[key] == value for d in draws) / len(draws)
    assert abs(share("audio_layout", "audio_only") - 0.4) < 0.03
    assert abs(share("image_layout", "text_blankline_image") - 0.4) < 0.03
    assert abs(share("keep_empty_think", True) - 0.2) < 0.03
    assert abs(share("use_ref", True) - 0.5) < 0.03
    assert abs(1 - share("system_prompt", None) - 0.2) < 0.03
    assert all(d["system_prompt"] is None for d in (data.draw_variations(rng, has_system_turn=True) for _ in range(50)))


def test_cut_conversation_backs_off_to_fit(tokenizer):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "tell me " * 100}, {"role": "assistant", "content": "ok " * 100}]
    assert data.cut_conversation(conv, 1, tokenizer, 1000) == conv
    assert data.cut_conversation(conv, 1, tokenizer, 200) == conv[:2]   # the second reply does not fit


def test_scheduled_sampling_touches_only_labelled_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.full((4, 9, 50), mo.AUDIO_PAD)
    ids[:, mo.TEXT_ROW] = 100
    ids[:, mo.TEXT_ROW, 10:20] = mo.IMAGE_PLACEHOLDER
    text_labels = torch.full((4, 50), mo.IGNORE)
    text_labels[:, 5:30] = 1
    audio_labels = torch.full((4, 8, 50), mo.IGNORE)
    audio_labels[:, 3, 30:40] = 1
    out = data.scheduled_sampling(ids, text_labels, audio_labels, p=0.5, generator=g)
    changed = out != ids
    assert changed[:, :8, 30:40].any() and not changed[:, :8, :30].any() and not changed[:, :8, 40:].any()
    assert changed[:, mo.TEXT_ROW, 5:10].any() and changed[:, mo.TEXT_ROW, 20:30].any()
    assert not changed[:, mo.TEXT_ROW, 10:20].any() and not changed[:, mo.TEXT_ROW, :5].any()
    assert torch.equal(changed[:, :8, 30:40].all(1), changed[:, :8, 30:40].any(1))   # all 8 layers together


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_scheduled_sampling_replaces_a_share_p_of_labelled_inputs(p):
    """Spec section 3: each labelled position is corrupted with probability p (0.05 in training), so about
    p of them change, not 1 - p. 20000 positions: the share's standard deviation is at most 0.003."""
    B, T = 40, 500
    ids = torch.full((B, 9, T), 7)                    # every audio and text input a plain id
    labels = torch.ones(B, T, dtype=torch.long)        # everything labelled
    out = data.scheduled_sampling(ids, labels, labels[:, None].expand(B, 8, T), p=p,
                                generator=torch.Generator().manual_seed(0))
    changed = out != ids
    audio_share = changed[:, :8].any(1).float().mean().item()   # all 8 layers of a position change together
    text_share = changed[:, mo.TEXT_ROW].float().mean().item()  # (a random id equal to 7 hides 1 in 6400)
    assert abs(audio_share - p) < 0.015 and abs(text_share - p) < 0.015, (audio_share, text_share)
    assert out[:, :8].max() < mo.AUDIO_VOCAB and out[:, mo.TEXT_ROW].max() < mo.TEXT_VOCAB
