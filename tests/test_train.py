"""train.py: parquet rows, samples and batches, bad rows, the training step's own loss path, its speed and
memory flags (--grad_checkpointing, --compile, --group_by_length, --dtype, an out-of-memory step), the
device checks, and short runs (demo, resume after a kill, DDP)."""
import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import minimind_o as mo
import data
import files
import side_assets
import train
from conftest import ROOT, tiny_config

TINY_RUN = ["--max_seq_len", "64", "--batch_size", "4", "--hidden_size", "64", "--num_hidden_layers", "2"]


def wav_bytes(sr, seconds=1.0, channels=1, fmt="WAV"):
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone] * channels, 1) if channels > 1 else tone, sr, format=fmt)
    return buf.getvalue()


def png_bytes(size=(40, 30)):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def codes(frames, seed=0):
    return np.random.default_rng(seed).integers(0, mo.CODEBOOK_SIZE, frames * mo.N_CODEBOOKS).tolist()


def chat(*texts):
    return json.dumps([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)])


def write(path, columns, types):
    pq.write_table(pa.table(columns, schema=pa.schema([(k, types[k]) for k in columns])), path)
    return str(path)


FULL_TYPES = dict(conversations=pa.large_string(), question_audios=pa.list_(pa.binary()),
                  answer_audios=pa.list_(pa.list_(pa.int64())), image_bytes=pa.list_(pa.binary()),
                  ref_audios=pa.list_(pa.int16()), spk_emb=pa.list_(pa.float64()))


def a2a_file(path):
    """Two rows with every column: question audio at 24 kHz stereo, 16 kHz and 44.1 kHz FLAC, an image, a voice."""
    return write(path, dict(
        conversations=[chat("<image>What is this?", "A red square."), chat("Hi", "Hello!", "Bye", "Goodbye.")],
        question_audios=[[wav_bytes(24000, channels=2)], [wav_bytes(16000), wav_bytes(44100, 2.0, fmt="FLAC")]],
        answer_audios=[[codes(5)], [codes(3, 1), codes(4, 2)]],
        image_bytes=[[png_bytes()], []],
        ref_audios=[codes(6, 3), []],
        spk_emb=[np.linspace(-1, 1, 192).tolist(), []]), FULL_TYPES)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return data.write_demo_data(str(tmp_path_factory.mktemp("demo") / "demo.parquet"), rows=64)


# -- parquet rows --------------------------------------------------------------------------------

def test_parquet_files_round_trip(tmp_path):
    a = a2a_file(tmp_path / "a2a.parquet")
    b = write(tmp_path / "i2t.parquet", dict(conversations=[chat("<image>Describe.", "A cat.")],
                                            image_bytes=[png_bytes()]),
              dict(conversations=pa.string(), image_bytes=pa.binary()))  # plain string and bytes, fewer columns
    rows = data.ParquetRows([a, b])
    assert len(rows) == 3 and rows.has_any("question_audios") and rows.has_any("image_bytes")
    assert not data.ParquetRows([b]).has_any("question_audios")

    first, second, third = rows.read(0), rows.read(1), rows.read(2)
    assert (first.file, first.row, second.row, third.file, third.row) == ("a2a.parquet", 0, 1, "i2t.parquet", 0)
    assert first.conversations == json.loads(chat("<image>What is this?", "A red square."))
    assert first.question_audios == [wav_bytes(24000, channels=2)]
    assert [a.tolist() for a in first.answer_audios] == [codes(5)]
    assert first.image == png_bytes() and first.ref_codes.tolist() == codes(6, 3)
    np.testing.assert_allclose(first.spk_emb, np.linspace(-1, 1, 192), rtol=1e-6)
    assert [a.tolist() for a in second.answer_audios] == [codes(3, 1), codes(4, 2)]
    assert second.question_audios[1] == wav_bytes(44100, 2.0, fmt="FLAC")
    assert second.image is None and second.ref_codes is None and second.spk_emb is None
    assert third.image == png_bytes() and third.answer_audios == [] and third.question_audios == []


def test_sample_is_build_sample_with_drawn_variations(tokenizer, tmp_path):
    rows = data.ParquetRows([a2a_file(tmp_path / "a.parquet")])
    dataset = data.OmniDataset(rows, tokenizer, 128, scheduled_sampling=0.0)
    row = rows.read(0)
    row.question_audios, row.image = [], None  # text and speech out only
    sample = dataset.make_sample(row, random.Random(7))
    expected = mo.build_sample(row.conversations, tokenizer, 128, answer_codes=row.answer_audios[0],
                               ref_codes=row.ref_codes, has_spk=True,
                               **data.draw_variations(random.Random(7), has_system_turn=False))
    for got, want in zip((sample.input_ids, sample.text_labels, sample.audio_labels), expected):
        assert torch.equal(got, want)
    # the valid length ends at the last label: the last layer's stop id
    L = sample.length
    assert (sample.text_labels[L:] == mo.IGNORE).all() and (sample.audio_labels[:, L:] == mo.IGNORE).all()
    assert sample.audio_labels[7, L - 1] == mo.AUDIO_STOP


def test_question_audio_and_image_become_encoder_inputs(tokenizer, tmp_path):
    rows = data.ParquetRows([a2a_file(tmp_path / "a.parquet")])
    enc = data.Encoders(speech_frontend=side_assets.sensevoice_front_end(), image_processor=side_assets.siglip_image_processor())
    plain = data.OmniDataset(rows, tokenizer, 256, enc, augment="none")
    s = plain[0]
    # 1 s at 24 kHz stereo -> 16 kHz mono: 98 fbank frames of 10 ms -> ceil(98 / 6) = 17 stacked frames
    assert s.speech.shape == (17, mo.SPEECH_FEAT_DIM)
    assert (s.input_ids[8] == mo.AUDIO_PLACEHOLDER).sum() in (0, 17)  # 0 for the text_only layout
    torch.testing.assert_close(s.spk_emb, torch.linspace(-1, 1, 192))
    row = rows.read(0)
    row.question_audios = []  # (with the audio_only layout the question audio replaces the <image> mark too)
    s = plain.make_sample(row, random.Random(0))
    assert s.image.shape == (3, 256, 256) and (s.input_ids[8] == mo.IMAGE_PLACEHOLDER).sum() == mo.IMAGE_TOKENS
    # multi-turn: the audio of the last kept user turn (1 s at 16 kHz, or 2 s at 44.1 kHz: 33 frames)
    lengths = {len(plain.make_sample(rows.read(1), random.Random(k)).speech) for k in range(8)}
    assert lengths == {17, 33}

    augmented = data.OmniDataset(rows, tokenizer, 256, enc, augment="both")
    feats = [augmented.make_sample(rows.read(0), random.Random(k)).speech for k in range(6)]
    assert any(f.shape != (17, mo.SPEECH_FEAT_DIM) or not torch.equal(f, plain[0].speech) for f in feats)
    assert torch.equal(augmented.make_sample(rows.read(0), random.Random(3)).speech, feats[3])  # seeded


def test_batch_is_padded_to_its_longest_sample_and_loses_nothing(tokenizer, demo_file):
    dataset = data.OmniDataset(data.ParquetRows([demo_file]), tokenizer, 96)
    samples = [dataset[i] for i in range(4)]
    batch = data.collate(samples)
    T = max(s.length for s in samples)
    assert batch.input_ids.shape == (4, 9, T) and T < 95 and batch.tokens == sum(s.length for s in samples)
    assert batch.spk_emb.shape == (4, 192)

    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config()).train()
    trimmed = mo.omni_loss(model(batch.input_ids, spk_emb=batch.spk_emb), batch.text_labels, batch.audio_labels)
    full = [torch.stack([getattr(s, k) for s in samples]) for k in ("input_ids", "text_labels", "audio_labels")]
    padded = mo.omni_loss(model(full[0], spk_emb=batch.spk_emb), full[1], full[2])
    torch.testing.assert_close(torch.stack(trimmed), torch.stack(padded), rtol=1e-5, atol=1e-5)


def loss_and_grads(model, losses):
    """The (text, audio, aux) losses and every trainable parameter's gradient of their sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(losses), params, allow_unused=True)
    return torch.stack(losses).detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("use_moe", [False, True])
def test_training_losses_equal_omni_loss_of_the_forward(tokenizer, demo_file, monkeypatch, use_moe):
    """The labelled forward (heads only where labels are, in chunks) gives the losses of the unlabelled forward's
    logits (written out below, and omni_loss) and its aux loss, with the same gradients: on a batch with
    positions past its labels and speech past its text (where a dense model's upper blocks stop), a spoken
    question, chunks split mid-batch, a layer without labels, a text label at the last position (no cut), and
    no labels at all."""
    monkeypatch.setattr(mo, "HEAD_CHUNK", 7)  # several chunks per head
    dataset = data.OmniDataset(data.ParquetRows([demo_file]), tokenizer, 96, scheduled_sampling=0.0)
    samples = [dataset[i] for i in range(2)]
    ids, text_labels, audio_labels = (torch.stack([getattr(s, k) for s in samples])
                                      for k in ("input_ids", "text_labels", "audio_labels"))
    assert upper_width(text_labels, 1) < max(s.length for s in samples)   # the upper blocks stop early,
    assert upper_width(text_labels, train.COMPILE_WIDTH) < ids.shape[-1]    # rounded up too
    ids[0, mo.TEXT_ROW, 1:4] = mo.AUDIO_PLACEHOLDER       # a question of 3 speech frames in sample 0
    inputs = dict(audio_embeds=[torch.randn(3, mo.SPEECH_EMBED_DIM), None], spk_emb=torch.randn(2, 192))
    no_layer_3 = audio_labels.clone()
    no_layer_3[:, 3] = mo.IGNORE
    to_the_end = text_labels.clone()
    to_the_end[1, -1] = 42
    nothing = (torch.full_like(text_labels, mo.IGNORE), torch.full_like(audio_labels, mo.IGNORE))
    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config(num_hidden_layers=2, num_talker_hidden_layers=1, use_moe=use_moe)).train()
    for labels in ((text_labels, audio_labels), (text_labels, no_layer_3), (to_the_end, audio_labels), nothing):
        out = model(ids, **inputs)
        expected, expected_grads = loss_and_grads(model, (*reference_loss(out, *labels), out.aux_loss))
        for multiple in (1, train.COMPILE_WIDTH):  # where the upper blocks stop: exactly, and as --compile rounds it
            model.width_multiple = multiple
            got, grads = loss_and_grads(model, model(ids, **inputs, text_labels=labels[0], audio_labels=labels[1]))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(torch.stack(mo.omni_loss(out, *labels)), expected[:2], rtol=1e-5, atol=1e-6)
    assert got[:2].tolist() == [0, 0] and (got[2] > 0) == use_moe


def upper_width(text_labels, multiple):
    """Where a dense model's labelled forward stops its upper blocks: after the batch's last text label (at
    least 1), rounded up to a multiple."""
    last = max((t for t in range(text_labels.shape[1]) if (text_labels[:, t] != mo.IGNORE).any()), default=0)
    return min(text_labels.shape[1], math.ceil((last + 1) / multiple) * multiple)


def reference_loss(out, text_labels, audio_labels):
    """omni_loss written out over every position's logits at once (no chunks, no selection), as the spec says."""
    text = F.cross_entropy(out.text_logits.flatten(0, 1), text_labels.flatten(), ignore_index=mo.IGNORE, reduction="sum")
    ce = F.cross_entropy(out.audio_logits.permute(0, 3, 1, 2), audio_labels, ignore_index=mo.IGNORE, reduction="none")
    labelled = audio_labels != mo.IGNORE                                                   # (B, 8, T)
    weight = torch.where(audio_labels == mo.AUDIO_STOP, mo.STOP_WEIGHT, 1.0) * labelled
    per_layer = (ce * weight).sum((0, 2)) / labelled.sum((0, 2)).clamp_min(1)              # (8,)
    return text / (text_labels != mo.IGNORE).sum().clamp_min(1), per_layer.mean()


def test_epoch_batches_split_rows_across_processes_and_resume_mid_epoch():
    ranks = [list(data.EpochBatches(10, 2, seed=1, epoch=0, rank=r, world=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3] and data.batches_per_epoch(10, 2, 2) == 3
    seen = sum((sum(r, []) for r in ranks), [])
    assert sorted(seen) == list(range(10))
    assert list(data.EpochBatches(10, 2, seed=1, epoch=0, rank=1, world=2, skip=1)) == ranks[1][1:]
    assert list(data.EpochBatches(10, 2, seed=1, epoch=1)) != list(data.EpochBatches(10, 2, seed=1, epoch=0))


def test_group_by_length_batches_similar_lengths_in_a_seeded_order_that_resumes():
    lengths = torch.randint(20, 500, (203,), generator=torch.Generator().manual_seed(0))
    grouped = lambda **kw: list(data.EpochBatches(203, 4, **dict(dict(seed=1, epoch=0, lengths=lengths), **kw)))
    width = lambda batches: sum(len(b) * int(lengths[b].max()) for b in batches)  # positions computed
    one = grouped()
    assert one == grouped() and one != grouped(seed=2) and one != grouped(epoch=1)  # the seed and epoch decide
    assert sorted(sum(one, [])) == list(range(203)) and len(one) == data.batches_per_epoch(203, 4, 1)
    in_order = list(data.EpochBatches(203, 4, seed=1, epoch=0))  # the release's order, without lengths
    assert width(one) < 0.7 * width(in_order)  # less padding
    assert max(lengths[one[0]]) == max(lengths) and len(one[-1]) == 3  # the longest first, the partial batch last
    assert grouped(skip=5) == one[5:]  # resuming mid-epoch continues the same sequence
    ranks = [grouped(rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == data.batches_per_epoch(203, 4, 2)
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))  # each row goes to one process
    in_order = list(data.EpochBatches(203, 4, seed=1, epoch=0, rank=1, world=2))
    assert sorted(sum(ranks[1], [])) == sorted(sum(in_order, []))  # a process's rows are those of the release's order
    assert ranks[1] != in_order


def test_estimated_lengths_follow_the_samples(tokenizer, tmp_path):
    """T2A rows whose replies last 1 to 20 s of speech, one with question audio, one with an image, one broken."""
    frames = [12, 250, 40, 120, 25, 80]
    rows = [chat(f"Question {i}?", "word " * (f // 4)) for i, f in enumerate(frames)]
    path = write(tmp_path / "t2a.parquet", dict(
        conversations=rows[:4] + [chat("<image>What is it?", "A cat."), '[{"role": "us'],
        question_audios=[[], [], [wav_bytes(16000, seconds=3.0)], [], [], []],
        answer_audios=[[codes(f, i)] for i, f in enumerate(frames)],
        image_bytes=[[], [], [], [], [png_bytes()], []]), FULL_TYPES)
    enc = data.Encoders(speech_frontend=side_assets.sensevoice_front_end(), image_processor=side_assets.siglip_image_processor())
    dataset = data.OmniDataset(data.ParquetRows([path]), tokenizer, 256, enc, augment="none", scheduled_sampling=0)
    estimates = data.estimated_lengths(dataset.rows, tokenizer, 256).tolist()
    lengths = [dataset[i].length for i in range(5)]
    assert estimates[1] == 256 and estimates[5] == 256  # longer than max_len, and the row that cannot be read
    for estimate, length in zip(estimates, lengths):  # the draws (a system prompt, layouts) add up to ~25 tokens
        assert abs(estimate - length) <= 30, (estimates, lengths)


def test_a_run_grouped_by_length_resumes_with_the_same_losses(tmp_path, tokenizer_flag, monkeypatch):
    data_file = data.write_demo_data(str(tmp_path / "rows16.parquet"), rows=16)
    flags = ["--data", data_file, "--from_weight", "none", "--group_by_length", "--epochs", "2", "--accumulation_steps",
             "2", "--save_every", "3", "--log_every", "1", "--num_workers", "0", *TINY_RUN, *tokenizer_flag]
    whole = train.main(["--out_dir", str(tmp_path / "whole"), *flags])
    assert whole["steps"] == 4  # 16 rows in 4 batches of 4, 2 a step, 2 epochs

    real_inputs, calls = train.batch_inputs, []

    def killed_in_step_4(*args):  # after step 3 was saved: in the second epoch, at its batch 3 (of 2 and 3)
        calls.append(1)
        if len(calls) == 7:  # two micro-batches a step
            raise KeyboardInterrupt
        return real_inputs(*args)
    monkeypatch.setattr(train, "batch_inputs", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out_dir", str(tmp_path / "killed"), *flags])
    monkeypatch.setattr(train, "batch_inputs", real_inputs)
    resumed = train.main(["--out_dir", str(tmp_path / "killed"), "--resume", *flags])
    read = lambda summary: [json.loads(line)["loss"] for line in open(summary["metrics"])]
    assert len(read(resumed)) == 4 and read(resumed) == pytest.approx(read(whole), abs=1e-6)
    with pytest.raises(ValueError, match="different run.*--group_by_length True -> False"):
        train.main(["--out_dir", str(tmp_path / "killed"), "--resume", *[f for f in flags if f != "--group_by_length"]])


def forward_backward(net, batch, autocast=contextlib.nullcontext()):
    """A micro-batch as train.py's loop takes it: the forward pass with labels, the backward pass of the
    summed losses -> (4,) loss, text, audio, MoE aux."""
    with autocast:
        losses = net(batch.input_ids, **train.batch_inputs(batch, data.Encoders(), "all"))
    sum(losses).backward()
    return torch.stack([sum(losses), *losses]).detach()


@pytest.mark.parametrize("use_moe", [False, True])
def test_grad_checkpointing_gives_the_same_losses_and_gradients_from_fewer_saved_tensors(tokenizer, demo_file,
                                                                                        use_moe):
    dataset = data.OmniDataset(data.ParquetRows([demo_file]), tokenizer, 96)
    batch = data.collate([dataset[i] for i in range(2)])

    def step(checkpointing):
        torch.manual_seed(0)
        model = mo.MiniMindO(tiny_config(use_moe=use_moe)).train()
        model.thinker.checkpointing = model.talker.checkpointing = checkpointing
        saved = []  # bytes of every tensor the forward pass keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            losses = forward_backward(model, batch)
        return losses, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, sum(saved)

    (plain, plain_grads, plain_saved), (checkpointed, grads, saved) = step(False), step(True)
    assert torch.equal(checkpointed, plain) and (plain[3] > 0) == use_moe  # loss, text, audio, MoE aux
    assert grads.keys() == plain_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], plain_grads[k], rtol=1e-6, atol=1e-7, msg=k)
    # the blocks' activations are recomputed, not kept (measured: 0.31x dense, 0.22x MoE; 0.56x and 0.48x with
    # the Thinker's alone checkpointed); the heads' chunks recompute their logits either way
    assert saved < 0.4 * plain_saved


OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which "
                 "1.02 GiB is free. Including non-PyTorch memory, this process has 6.75 GiB memory in use.")


def test_out_of_memory_in_a_step_names_the_settings_that_fit(tmp_path, tokenizer_flag, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(OUT_OF_MEMORY)
    monkeypatch.setattr(train, "batch_inputs", no_memory)  # in a micro-batch's forward pass
    flags = ["--out_dir", str(tmp_path), "--num_workers", "0", *TINY_RUN, "--accumulation_steps", "3", *tokenizer_flag]
    with pytest.raises(train.OutOfMemory) as e:
        train.main(flags)
    message = str(e.value)
    assert message.startswith("out of cpu memory in step 1 (CUDA out of memory. Tried to allocate 2.00 GiB) with "
                              "--batch_size 4 --accumulation_steps 3 --max_seq_len 64 --dtype float32. ")
    assert "--batch_size 2 --accumulation_steps 6 (the same 12 samples per optimizer step" in message
    assert "--grad_checkpointing (the same training" in message and "--max_seq_len 32" in message
    assert "8, 12, 16 and 24 GB" in message
    with pytest.raises(train.OutOfMemory) as e:
        train.main(flags + ["--grad_checkpointing", "--batch_size", "1", "--save_weight", "again"])
    assert "--grad_checkpointing (" not in str(e.value) and "--batch_size 0" not in str(e.value)


def test_out_of_memory_on_the_command_line_is_one_line_not_a_traceback(tmp_path, tokenizer_flag):
    """Every attention call runs out of memory, in a real `python train.py` process."""
    program = ("import runpy, torch\n"
               "def no_memory(*args, **kwargs):\n"
               f"    raise torch.OutOfMemoryError({OUT_OF_MEMORY!r})\n"
               "torch.nn.functional.scaled_dot_product_attention = no_memory\n"
               "runpy.run_path('train.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", program, "--out_dir", str(tmp_path), "--num_workers", "0",
                           *TINY_RUN, *tokenizer_flag], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith("train.py: out of cpu memory in step 1 (CUDA out of memory.")


def test_compile_widths_are_rounded_up_and_change_no_loss(tokenizer, demo_file):
    dataset = data.OmniDataset(data.ParquetRows([demo_file]), tokenizer, 96)
    samples = [dataset[i] for i in range(3)]
    exact, rounded = data.collate(samples), data.collate(samples, width_multiple=train.COMPILE_WIDTH)
    T = exact.input_ids.shape[-1]
    assert T < train.COMPILE_WIDTH < 95 and rounded.input_ids.shape[-1] == train.COMPILE_WIDTH
    assert data.collate(samples, width_multiple=1000).input_ids.shape[-1] == 95  # never past the samples' length
    assert (rounded.text_labels[:, T:] == mo.IGNORE).all() and (rounded.audio_labels[..., T:] == mo.IGNORE).all()
    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config()).train()
    outs = [model(b.input_ids, spk_emb=b.spk_emb) for b in (exact, rounded)]
    torch.testing.assert_close(outs[1].text_logits[:, :T], outs[0].text_logits)  # causal: later columns change nothing
    torch.testing.assert_close(outs[1].audio_logits[:, :, :T], outs[0].audio_logits)
    losses = [torch.stack(mo.omni_loss(o, b.text_labels, b.audio_labels)) for o, b in zip(outs, (exact, rounded))]
    torch.testing.assert_close(losses[1], losses[0])


def test_compile_makes_one_graph_per_batch_width_not_per_batch(tmp_path, tokenizer_flag, monkeypatch):
    """Dynamo's own graph count, with its eager backend (inductor's C++ compile takes minutes on a CPU):
    the lower blocks and the Talker one graph per batch width, the upper blocks one per width they run on."""
    import functools
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    batches, collate = [], data.collate
    monkeypatch.setattr(data, "collate", lambda samples, **kw: batches.append((samples, collate(samples, **kw)))
                        or batches[-1][1])
    torch._dynamo.reset()
    counters.clear()
    train.main(["--out_dir", str(tmp_path), "--compile", "--max_steps", "4", "--save_every", "0", "--num_workers", "0",
                *TINY_RUN, "--max_seq_len", "192", *tokenizer_flag])
    torch._dynamo.reset()
    longest = {max(s.length for s in samples) for samples, _ in batches}
    width = {batch.input_ids.shape[-1] for _, batch in batches}
    upper = {upper_width(batch.text_labels, train.COMPILE_WIDTH) for _, batch in batches}
    assert all(w % train.COMPILE_WIDTH == 0 for w in width | upper) and len(longest) > len(width)
    assert counters["stats"]["unique_graphs"] == 2 * len(width) + len(upper)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_an_absent_device_is_refused_in_one_line_naming_the_flag(tmp_path, monkeypatch):
    done = subprocess.run([sys.executable, "train.py", "--device", "mps", "--out_dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("train.py: --device mps: MPS (an Apple-silicon Mac's GPU) is not available here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, message in [("cuda", "PyTorch sees no CUDA GPU here"), ("cuda:1", "PyTorch sees no CUDA GPU here"),
                          ("tpu", "not a device name"), ("meta", "train.py runs on cuda, mps or cpu")]:
        with pytest.raises(ValueError, match=f"^--device {name}: {message}"):
            train.main(["--device", name, "--out_dir", str(tmp_path)])
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_the_cpu_trains_in_float32_by_default_and_refuses_float16(tmp_path):
    args = train.parse_args(["--device", "cpu"])
    train.check_device(args)
    assert args.dtype == "float32"
    with pytest.raises(ValueError, match="^--dtype float16: float16 training needs a GPU"):
        train.main(["--device", "cpu", "--dtype", "float16", "--out_dir", str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_bfloat16_on_the_cpu_autocasts_the_step(tokenizer, demo_file):
    """--dtype bfloat16 --device cpu trains in bf16 autocast: losses near float32's but not equal to them
    (measured on three batches of the tiny model: 2e-6 to 7e-5 relative)."""
    dataset = data.OmniDataset(data.ParquetRows([demo_file]), tokenizer, 96)
    batch = data.collate([dataset[i] for i in range(2)])

    def first_losses(dtype):
        torch.manual_seed(0)
        args = train.parse_args(["--device", "cpu", "--dtype", dtype, *TINY_RUN])
        train.check_device(args)
        learner, _ = train.build_learner(args, train.Processes(0, 1, torch.device("cpu")), None)
        return forward_backward(learner.net, batch, learner.autocast)

    plain, half = first_losses("float32"), first_losses("bfloat16")
    assert not torch.equal(half[:3], plain[:3])
    torch.testing.assert_close(half[:3], plain[:3], rtol=5e-3, atol=0)


def test_the_demo_trains_its_two_exchange_rows_whole(tokenizer, demo_file):
    """At the demo's max_seq_len a second exchange is kept with the first (a second question in the chat needs it)."""
    rows = data.ParquetRows([demo_file])
    two = [c for c in (rows.read(i).conversations for i in range(len(rows))) if len(c) == 4]
    max_len = train.parse_args([]).max_seq_len
    assert two and all(data.cut_conversation(c, 1, tokenizer, max_len) == c for c in two)


def test_learning_rate_schedule_is_the_release_cosine():
    assert train.lr_at(0, 100, 5e-4) == pytest.approx(5e-4)
    assert train.lr_at(50, 100, 5e-4) == pytest.approx(5e-4 * 0.55)
    assert train.lr_at(100, 100, 5e-4) == pytest.approx(5e-5)


# -- bad rows ------------------------------------------------------------------------------------

GOOD = dict(conversations=chat("Hi", "Hello."), answer_audios=[codes(2)], question_audios=[], image_bytes=[])
BAD = {"json": (dict(conversations='[{"role": "user", "content": "Hi"'), "conversations", "malformed JSON"),
       "codes": (dict(answer_audios=[codes(2)[:-3]]), "answer_audios", "13 codes, not a multiple of 8"),
       "role": (dict(conversations=json.dumps([{"role": "robot", "content": "beep"}])), "conversations",
                "unknown role 'robot'"),
       "audio": (dict(question_audios=[b"RIFF not really a wav"]), "question_audios", "cannot decode audio"),
       "image": (dict(conversations=chat("<image>Hi", "Hello."), image_bytes=[b"\x89PNG broken"]), "image_bytes",
                 "cannot read image"),
       # rows that would be trained on without teaching anything
       "no_reply": (dict(conversations=chat("Hi")), "conversations", "no assistant turn"),
       "cut_off": (dict(conversations=chat("word " * 80, "Hello.")), "conversations",
                   "the reply starts after --max_seq_len 64"),
       "unmarked_image": (dict(image_bytes=[png_bytes()]), "image_bytes", "an image, but no turn has an <image> mark"),
       "empty_audio": (dict(conversations=chat("", "Hello."), question_audios=[b""]), "question_audios",
                       "an empty \\(0-byte\\) audio file for a question with no text")}


def bad_file(path, kinds):
    rows = [GOOD] + [dict(GOOD, **BAD[k][0]) for k in kinds] + [GOOD]
    return write(path, {k: [r[k] for r in rows] for k in GOOD}, FULL_TYPES)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_row_error_names_file_row_and_column(tokenizer, tmp_path, kind):
    path = bad_file(tmp_path / f"bad_{kind}.parquet", [kind])
    enc = data.Encoders(speech_frontend=side_assets.sensevoice_front_end(), image_processor=side_assets.siglip_image_processor())
    dataset = data.OmniDataset(data.ParquetRows([path]), tokenizer, 64, enc)
    assert all(isinstance(dataset[i], data.Sample) for i in (0, 2))  # the good rows around it are fine
    _, column, problem = BAD[kind]
    with pytest.raises(data.BadRow) as bad:  # raised where it is found (see the next tests for a run)
        dataset[1]
    assert re.match(f"bad_{kind}.parquet, row 1, column {column}: {problem}", str(bad.value))
    skipping = data.OmniDataset(data.ParquetRows([path]), tokenizer, 64, enc, skip_bad_rows=True)
    batch = data.collate([skipping[i] for i in range(3)])  # the bad row is replaced by the next one
    assert len(batch.input_ids) == 3 and len(batch.bad_rows) == 1 and column in batch.bad_rows[0]
    assert torch.equal(batch.input_ids[1], batch.input_ids[2])


def test_skip_bad_rows_counts_them_in_a_run(tmp_path, capsys, tokenizer_flag):
    path = bad_file(tmp_path / "bad.parquet", ["json", "codes", "role"])  # three bad rows in a row
    summary = train.main(["--data", path, "--from_weight", "none", "--out_dir", str(tmp_path), "--num_workers", "0",
                          "--skip_bad_rows", "--save_every", "0", "--epochs", "3", *TINY_RUN, *tokenizer_flag])
    assert summary["bad_rows"] == 3 and summary["steps"] == 6
    out = capsys.readouterr().out
    assert "skipped 3 bad rows" in out and out.count("skipped bad row: ") == 3  # each once, not once an epoch


def test_a_file_of_rows_that_teach_nothing_is_an_error_not_a_zero_loss(tmp_path, tokenizer_flag):
    path = write(tmp_path / "silent.parquet", dict(conversations=[chat("Hi"), chat("Hello?")]),
                 dict(conversations=pa.string()))
    flags = ["--data", path, "--from_weight", "none", "--out_dir", str(tmp_path), "--num_workers", "0", *TINY_RUN,
             *tokenizer_flag]
    with pytest.raises(data.BadRow, match="silent.parquet, row 0, column conversations: no assistant turn"):
        train.main(flags)
    with pytest.raises(ValueError, match="every row of the data is bad"):
        train.main(flags + ["--skip_bad_rows"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_row_stops_the_run_with_its_own_message(tmp_path, tokenizer_flag, workers):
    """Also from DataLoader worker processes, which would turn an exception raised there into another type."""
    path = bad_file(tmp_path / "bad.parquet", ["json"])
    with pytest.raises(data.BadRow) as e:
        train.main(["--data", path, "--from_weight", "none", "--out_dir", str(tmp_path), "--num_workers",
                    str(workers), *TINY_RUN, "--batch_size", "2", *tokenizer_flag])
    assert str(e.value).startswith("bad.parquet, row 1, column conversations: malformed JSON")


def test_columns_of_the_wrong_type_are_named(tmp_path):
    rows = dict(GOOD, answer_audios=codes(2))  # flat codes, not one list per reply
    path = write(tmp_path / "flat.parquet", {k: [v] for k, v in rows.items()},
                 dict(FULL_TYPES, answer_audios=pa.list_(pa.int64())))
    with pytest.raises(data.BadRow, match=r"flat.parquet, row -, column answer_audios: of type list<.*int64>; "
                                           r"it should hold a list of code lists"):
        data.ParquetRows([path])
    path = write(tmp_path / "text_spk.parquet", {**{k: [v] for k, v in GOOD.items()}, "spk_emb": ["0.1 0.2"]},
                 dict(FULL_TYPES, spk_emb=pa.string()))
    with pytest.raises(data.BadRow, match="column spk_emb: of type string; it should hold a list of numbers"):
        data.ParquetRows([path])


def test_an_empty_or_unreadable_parquet_file_is_named(tmp_path):
    empty = write(tmp_path / "empty.parquet", dict(conversations=[]), dict(conversations=pa.string()))
    with pytest.raises(ValueError, match=f"{empty} has no rows"):
        data.ParquetRows([empty])
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{tmp_path / 'zero.parquet'} is not a readable parquet file"):
        data.ParquetRows([str(tmp_path / "zero.parquet")])
    damaged = data.write_demo_data(str(tmp_path / "damaged.parquet"), rows=64)
    whole = bytearray(open(damaged, "rb").read())
    middle = len(whole) // 3
    whole[middle:middle + 2000] = random.Random(0).randbytes(2000)  # bytes damaged mid-file: "Corrupt snappy ..."
    open(damaged, "wb").write(whole)
    with pytest.raises(ValueError, match=f"{damaged} is not a readable parquet file .*: is it damaged"):
        data.ParquetRows([damaged])


def test_a_decompression_bomb_image_is_a_bad_row(tokenizer, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 40x30 test image counts as a bomb (> 2x the limit)
    rows = write(tmp_path / "bomb.parquet", dict(conversations=[chat("Hi", "Hello."), chat("<image>Hi", "Hello.")],
                                                 image_bytes=[[], [png_bytes()]]), FULL_TYPES)
    enc = data.Encoders(image_processor=side_assets.siglip_image_processor())
    with pytest.raises(data.BadRow, match="bomb.parquet, row 1, column image_bytes: cannot read image.*"
                                          "decompression bomb"):
        data.OmniDataset(data.ParquetRows([rows]), tokenizer, 64, enc)[1]
    skipping = data.OmniDataset(data.ParquetRows([rows]), tokenizer, 64, enc, skip_bad_rows=True)
    assert "decompression bomb" in skipping[1].skipped[0]


def test_metrics_cut_off_mid_line_are_resumed_and_a_broken_line_is_named(tmp_path):
    path = tmp_path / "demo_metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed while writing step 3
    train.MetricsLog(str(path), resume_step=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a metrics record"):
        train.MetricsLog(str(path), resume_step=2)


def test_resume_knows_a_data_file_by_what_it_is_not_how_it_is_spelled(tmp_path, monkeypatch, demo_file):
    monkeypatch.chdir(os.path.dirname(demo_file))
    os.symlink(demo_file, tmp_path / "link.parquet")
    setting = lambda *paths: train.resume_setting(train.parse_args(["--data", *paths]), "data")
    name = os.path.basename(demo_file)
    assert setting(name) == setting(f"./{name}") == setting(demo_file) == setting(str(tmp_path / "link.parquet"))
    assert setting(name) != setting(a2a_file(tmp_path / "other.parquet"))


def test_a_full_disk_during_a_save_is_said_and_the_previous_checkpoint_stays(tmp_path, tokenizer_flag, monkeypatch):
    real_save, calls = torch.save, []

    def fills_the_disk(obj, f):  # the first save (weights and resume state at step 1) fits, the next does not
        calls.append(f)
        if len(calls) > 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 128 vs 64")
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", fills_the_disk)
    flags = ["--out_dir", str(tmp_path), "--max_steps", "2", "--save_every", "1", "--num_workers", "0", *TINY_RUN,
             *tokenizer_flag]
    with pytest.raises(train.SaveFailed, match=f"cannot write {tmp_path / 'demo_64.pth'}: .*MB free on its disk: is "
                                               "it full, or not writable\\?\\). The previous file there is kept whole"):
        train.main(flags)
    assert torch.load(tmp_path / "demo_resume.pt", weights_only=False)["position"]["step"] == 1
    files.load_model(str(tmp_path / "demo_64.pth"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_command_line_errors_are_one_line_not_a_traceback(tmp_path, tokenizer_flag):
    done = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nowhere.parquet"), *tokenizer_flag],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"train.py: data file not found: {tmp_path / 'nowhere.parquet'}")


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "0 is not a positive number"), ("--accumulation_steps", "0", "0 is not a positive number"),
    ("--log_every", "0", "0 is not a positive number"), ("--epochs", "0", "0 is not a positive number"),
    ("--max_steps", "-3", "-3 is not a positive number"), ("--max_seq_len", "1", "1 is not a length of at least 16"),
    ("--scheduled_sampling", "2", "2 is not a probability"), ("--save_every", "-1", "-1 is not a number >= 0"),
    ("--learning_rate", "nan", "nan is not a number > 0"), ("--batch_size", "two", "'two' is not a number"),
])
def test_numeric_flags_are_checked_when_parsed(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        train.parse_args([flag, value])
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_missing_inputs_are_listed_together(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "HERE", str(tmp_path))  # a fresh clone: no tokenizer in models/
    monkeypatch.setattr(files, "reachable", lambda url: False)  # offline, so it cannot be fetched
    with pytest.raises(FileNotFoundError) as e:
        train.main(["--data", str(tmp_path / "sft_t2a_mini.parquet"), "--from_weight", str(tmp_path / "llm_768.pth"),
                    "--out_dir", str(tmp_path)])
    message = str(e.value)
    for what in ("no tokenizer", "sft_t2a_mini.parquet", "minimind-o_dataset", "llm_768.pth", "minimind-3o-pytorch"):
        assert what in message


def test_a_missing_encoder_names_its_option(tmp_path, tokenizer_flag):
    with pytest.raises(FileNotFoundError, match=r"--speech_encoder: .*nowhere/config.yaml not found"):
        train.main(["--data", a2a_file(tmp_path / "a2a.parquet"), "--from_weight", "none", "--speech_encoder",
                    str(tmp_path / "nowhere"), "--out_dir", str(tmp_path), *TINY_RUN, *tokenizer_flag])


def test_without_a_tokenizer_it_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "HERE", str(tmp_path))  # a fresh clone: nothing in models/
    monkeypatch.setattr(files, "reachable", lambda url: False)  # and offline
    with pytest.raises(FileNotFoundError, match=r"(?s)hf download jingyaogong/minimind-3o .*--tokenizer"):
        train.main(["--out_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert not (tmp_path / "out" / "demo_t2a.parquet").exists()  # nothing written before the inputs were checked


def test_without_a_tokenizer_but_online_it_is_fetched(tmp_path, monkeypatch, tokenizer_flag):
    import huggingface_hub
    fetched = []

    def snapshot_download(repo, local_dir, allow_patterns):  # the hub, played by the tokenizer the tests use
        fetched.append((repo, allow_patterns))
        os.makedirs(local_dir, exist_ok=True)
        for name in allow_patterns:
            shutil.copy(os.path.join(tokenizer_flag[1], name), local_dir)
    monkeypatch.setattr(train, "HERE", str(tmp_path))
    monkeypatch.setattr(files, "reachable", lambda url: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = train.tokenizer_folder(train.parse_args([]))
    assert fetched == [("jingyaogong/minimind-3o", ["tokenizer.json"])] and folder == str(tmp_path / "models/minimind-3o")
    mo.load_tokenizer(folder)


def test_missing_start_weights_say_where_the_published_ones_are(tmp_path, demo_file, tokenizer_flag):
    with pytest.raises(FileNotFoundError, match="llm_768.pth.*minimind-3o-pytorch"):
        train.main(["--data", demo_file, "--from_weight", str(tmp_path / "llm_768.pth"), "--out_dir", str(tmp_path),
                    *tokenizer_flag])


# -- runs ----------------------------------------------------------------------------------------

def test_demo_run_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path, tokenizer_flag, capsys, monkeypatch):
    titles, plot = [], train.MetricsLog.plot
    monkeypatch.setattr(train.MetricsLog, "plot",
                        lambda self, png, title: titles.append(title) or plot(self, png, title))
    summary = train.main(["--out_dir", str(tmp_path), "--max_steps", "6", "--save_every", "0", *TINY_RUN,
                          *tokenizer_flag])
    out, err = capsys.readouterr()
    assert "it was taught six colour questions" in out and '"What colour is the sky?"' in out
    assert err.count(" 3/6 [") == 1  # the progress bar is drawn once a step
    assert titles[0].startswith("demo: 64-wide model") and '"audio" is memorising made-up codes' in titles[0]
    assert summary["last_loss"] < 0.9 * summary["first_loss"]
    lrs = [r["lr"] for r in map(json.loads, open(summary["metrics"]))]
    peak = train.DEMO["learning_rate"]
    assert lrs[0] < peak and lrs[0] == pytest.approx(train.lr_at(1, 6, peak)) and lrs[-1] == pytest.approx(peak / 10)
    model = files.load_model(summary["checkpoint"])
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert os.path.exists(summary["plot"]) and os.path.exists(summary["resume_state"])
    with open(summary["metrics"]) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "text", "audio", "aux", "lr", "samples_per_s", "tokens_per_s"} <= set(records[0])


def test_killed_run_resumes_with_the_same_losses(tmp_path, tokenizer_flag, capsys):
    flags = ["--max_steps", "6", "--save_every", "1", "--num_workers", "0", *TINY_RUN, "--batch_size", "2",
             *tokenizer_flag]
    whole = train.main(["--out_dir", str(tmp_path / "whole"), *flags])
    killed = tmp_path / "killed"
    metrics = killed / "demo_metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(killed), *flags], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(killed / "demo_resume.pt", weights_only=False)["position"]["step"]
    assert 0 < stopped_at < 6, "the run should have been killed part-way"

    resumed = train.main(["--out_dir", str(killed), "--resume", *flags])
    read = lambda path: [json.loads(line)["loss"] for line in open(path)]
    assert resumed["steps"] == 6
    assert read(resumed["metrics"])[stopped_at] == pytest.approx(read(whole["metrics"])[stopped_at], abs=1e-6)
    assert read(resumed["metrics"]) == pytest.approx(read(whole["metrics"]), abs=1e-5)
    with pytest.raises(ValueError, match="different run.*--batch_size 2 -> 3"):
        train.main(["--out_dir", str(killed), "--resume", *flags, "--batch_size", "3"])
    capsys.readouterr()
    again = train.main(["--out_dir", str(killed), "--resume", *flags])  # resuming a finished run trains nothing
    assert "nothing left to train" in capsys.readouterr().out
    assert again["steps"] == 6 and read(again["metrics"]) == read(resumed["metrics"])


def test_a_second_run_on_the_same_outputs_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, tokenizer_flag):
    flags = ["--out_dir", str(tmp_path), "--save_every", "0", "--num_workers", "0", *TINY_RUN, *tokenizer_flag]
    lock = tmp_path / "demo.lock"
    first = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.05)
        with pytest.raises(train.OutputInUse, match=f"{lock} is held by another training run \\(pid {first.pid}\\)"):
            train.main(["--max_steps", "1", *flags])
    finally:
        first.kill()
        first.wait()
    assert lock.read_text().strip() == str(first.pid)  # the killed run's lock file is still there
    leftover = tmp_path / ".demo_metrics.jsonl.0123456789ab.tmp.jsonl"  # what a kill mid-write leaves
    leftover.write_text('{"step": 1')
    summary = train.main(["--max_steps", "1", *flags])
    assert summary["steps"] == 1 and not leftover.exists() and not lock.exists()


def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, tokenizer_flag):
    """16 rows: one step is 2 processes x 2 micro-batches of 4 or 1 process x 4 micro-batches of 4, the same
    16 rows either way (EpochBatches splits one seeded order), so the losses and weights must be the same."""
    data_file = data.write_demo_data(str(tmp_path / "rows16.parquet"), rows=16)
    flags = ["--data", data_file, "--from_weight", "none", "--device", "cpu", "--epochs", "2", "--num_workers", "0",
             "--log_every", "1", "--save_every", "0", *TINY_RUN, *tokenizer_flag]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--out_dir", str(tmp_path / "two"), "--accumulation_steps", "2", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 steps of 4x2x2 samples" in done.stdout
    one = train.main(["--out_dir", str(tmp_path / "one"), "--accumulation_steps", "4", *flags])
    read = lambda path: [json.loads(line) for line in open(path)]
    two_records, one_records = read(tmp_path / "two" / "sft_omni_metrics.jsonl"), read(one["metrics"])
    assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == [1, 2]
    for key in ("loss", "text", "audio"):  # the same sums in another order: float32 rounding apart
        assert [r[key] for r in two_records] == pytest.approx([r[key] for r in one_records], rel=1e-5), key
    two_weights, one_weights = files.read_checkpoint(str(tmp_path / "two" / "sft_omni_64.pth")), files.read_checkpoint(one["checkpoint"])
    for k in one_weights:  # float16 files: a rounding step apart at most
        torch.testing.assert_close(two_weights[k], one_weights[k], atol=1e-3, rtol=1e-3, msg=k)


@pytest.fixture(scope="module")
def encoder_flags(tmp_path_factory):
    """Random-weight SenseVoice and SigLIP2 in the published folder layouts, as train.py flags."""
    root = tmp_path_factory.mktemp("encoders")
    return ["--speech_encoder", str(side_assets.build_sensevoice(root)),
            "--vision_encoder", str(side_assets.build_siglip(root))]


def test_speech_and_image_rows_train_through_the_frozen_encoders(tmp_path, encoder_flags, tokenizer_flag):
    flags = ["--data", a2a_file(tmp_path / "a2a.parquet"), "--from_weight", "none", "--mode", "audio_proj",
             *encoder_flags, "--out_dir", str(tmp_path),
             "--num_workers", "0", "--max_steps", "1", "--max_seq_len", "256", "--batch_size", "2",
             "--hidden_size", "64", "--num_hidden_layers", "2", *tokenizer_flag]
    summary = train.main(flags)
    assert np.isfinite(summary["last_loss"])
    start = mo.official_state_dict(train.build_model(train.parse_args(flags)))
    trained = files.read_checkpoint(summary["checkpoint"])
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(k.startswith("audio_proj.") for k in changed)  # only the speech projector learned


def test_projector_modes_step_over_batches_with_nothing_for_the_projector(tmp_path, encoder_flags, tokenizer_flag):
    """Batches of one, from a text row, a spoken row and an image row: in either mode two of the three
    steps have nothing for the projector that is being trained."""
    data_file = write(tmp_path / "mixed.parquet", dict(
        conversations=[chat("Hi", "Hello!"), chat("Listen.", "A tone."), chat("<image>What is this?", "Red.")],
        question_audios=[[], [wav_bytes(16000)], []], answer_audios=[[codes(2)], [codes(3)], [codes(2)]],
        image_bytes=[[], [], [png_bytes()]]), FULL_TYPES)
    for mode in ("audio_proj", "vision_proj"):
        summary = train.main(["--data", data_file, "--from_weight", "none", "--mode", mode, *encoder_flags,
                              "--out_dir", str(tmp_path / mode), "--num_workers", "0", "--batch_size", "1",
                              "--max_seq_len", "128", "--hidden_size", "64", "--num_hidden_layers", "2",
                              "--log_every", "1", *tokenizer_flag])
        assert summary["steps"] == 3 and np.isfinite(summary["last_loss"])


# -- encoder cache -------------------------------------------------------------------------------

def test_encoder_cache_ids_follow_the_data_file_and_the_encoder(tmp_path):
    data_file = a2a_file(tmp_path / "a2a.parquet")
    first = data.identity(data_file)
    assert first.startswith("a2a-") and data.identity(data_file) == first
    os.utime(data_file, ns=(0, 0))  # the same file, modified at another time: possibly different rows
    assert data.identity(data_file) != first
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"weights")
    cache = data.EncoderCache(tmp_path / "cache", "speech", folder)
    assert os.path.basename(cache.folder).startswith("speech-encoder-")
    (folder / "model.pt").write_bytes(b"other weights")
    assert data.EncoderCache(tmp_path / "cache", "speech", folder).folder != cache.folder

    output = torch.randn(5, mo.SPEECH_EMBED_DIM)
    assert cache.get("a2a-x/0-0") is None
    cache.put(["a2a-x/0-0"], output[None])
    stored = cache.get("a2a-x/0-0")
    assert stored.dtype == torch.float16 and torch.equal(stored, output.half())
    assert os.listdir(os.path.dirname(cache.path("a2a-x/0-0"))) == ["0-0.npy"]  # no temporary file left


def test_encoder_cache_is_written_then_read_with_the_same_losses(tmp_path, encoder_flags, monkeypatch, capsys,
                                                                 tokenizer_flag):
    encoded = {"speech": 0, "image": 0}  # samples that went through each encoder

    def counting(kind, run):
        def counted(encoder, inputs, *rest):
            encoded[kind] += len(inputs)
            return run(encoder, inputs, *rest)
        return counted

    monkeypatch.setattr(data, "run_speech_encoder", counting("speech", data.run_speech_encoder))
    monkeypatch.setattr(data, "run_vision_encoder", counting("image", data.run_vision_encoder))
    data_file, cache = a2a_file(tmp_path / "a2a.parquet"), tmp_path / "cache"
    epochs = 3

    def run(name, *flags):
        encoded.update(speech=0, image=0)
        summary = train.main(["--data", data_file, "--from_weight", "none", *encoder_flags, "--out_dir",
                              str(tmp_path / name), "--num_workers", "0", "--epochs", str(epochs), "--max_seq_len",
                              "256", "--batch_size", "2", "--hidden_size", "64", "--num_hidden_layers", "2",
                              "--log_every", "1", "--save_every", "0", *tokenizer_flag, *flags])
        return [json.loads(line)["loss"] for line in open(summary["metrics"])], dict(encoded)

    plain, plain_encoded = run("plain", "--augment", "none")
    assert plain_encoded == dict(speech=2 * epochs, image=epochs)  # two rows with a question, one with an image

    first, first_encoded = run("first", "--augment", "none", "--encoder_cache", str(cache))
    assert "encoder cache" in capsys.readouterr().out
    speech_files = sorted(p.name for p in cache.glob("speech-*/a2a-*/*.npy"))
    image_files = sorted(p.name for p in cache.glob("image-*/a2a-*/*.npy"))
    # each (row, user turn) and each image is encoded once; over the epochs row 1 asks both its questions
    assert image_files == ["0.npy"] and speech_files == ["0-0.npy", "1-0.npy", "1-1.npy"]
    assert first_encoded == dict(speech=3, image=1)
    assert first == pytest.approx(plain, rel=1e-4)  # the cache's float16 outputs change a loss very little

    again, again_encoded = run("again", "--augment", "none", "--encoder_cache", str(cache))
    assert again_encoded == dict(speech=0, image=0)
    assert again == first  # exactly: fresh outputs are rounded as the cache stores them (resume stays exact)

    augmented, augmented_encoded = run("augmented", "--augment", "both", "--encoder_cache", str(tmp_path / "aug"))
    assert augmented_encoded == dict(speech=2 * epochs, image=1)
    assert not list((tmp_path / "aug").glob("speech-*")) and len(list((tmp_path / "aug").glob("image-*/*/*"))) == 1
    assert "question audio is not cached: --augment both" in capsys.readouterr().out


# ---- starting from the text-only MiniMind (llm_768.pth) ---------------------------------------------

def text_only_weights(lm_head=True):
    """A tiny text-only MiniMind's weights in the release's layout: model.* and (optionally) lm_head.weight."""
    official = mo.official_state_dict(mo.MiniMindO(tiny_config()), torch.float32)
    return {k: v for k, v in official.items() if k.startswith("model.") or (lm_head and k == "lm_head.weight")}


def test_text_only_start_copies_last_thinker_blocks_into_talker(tmp_path):
    llm = text_only_weights()
    model = mo.MiniMindO(tiny_config())
    train.start_from_text_model(model, llm)
    assert torch.equal(model.thinker.embed_tokens.weight, llm["model.embed_tokens.weight"])
    for i in range(2):  # Talker block i <- Thinker block 4 - 2 + i
        assert torch.equal(model.talker.layers[i].self_attn.q_proj.weight, llm[f"model.layers.{2 + i}.self_attn.q_proj.weight"])
    torch.save(llm, tmp_path / "llm_64.pth")
    args = argparse.Namespace(seed=0, from_weight=str(tmp_path / "llm_64.pth"), use_moe=False)
    inferred = train.build_model(args)   # no config: a Talker as wide as the Thinker, 4 blocks, from its last blocks
    assert inferred.config.talker_hidden_size == 64 and len(inferred.talker.layers) == 4
    assert torch.equal(inferred.talker.layers[0].mlp.up_proj.weight, llm["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="llm_64.pth holds no talker.* weights.*train.py --from_weight"):
        files.load_model(args.from_weight)   # a text-only MiniMind is a training start, not a model to chat with


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_only_start_without_lm_head_keeps_the_embedding(dtype):
    """lm_head is tied to the embedding, so a checkpoint may leave it out; the embedding must still load
    (into a model of any dtype: the model's own random lm_head must not be copied over it)."""
    llm = text_only_weights(lm_head=False)
    model = mo.MiniMindO(tiny_config()).to(dtype)
    train.start_from_text_model(model, llm)
    assert torch.equal(model.thinker.embed_tokens.weight, llm["model.embed_tokens.weight"].to(dtype))


def test_a_foreign_checkpoint_is_not_taken_for_a_text_model():
    with pytest.raises(ValueError, match="not a MiniMind checkpoint: it has 'encoder.weight'"):
        train.start_from_text_model(mo.MiniMindO(tiny_config()), {"encoder.weight": torch.zeros(2)})


def test_the_benchmark_against_the_reference_measures_every_side():
    """benchmarks/bench_vs_reference.py step, at a tiny config: one JSON line per side, then the ratios."""
    from conftest import tokenizer_folder
    folder = os.environ.get("MINIMIND_O_REFERENCE")
    if not folder or not os.path.isfile(os.path.join(folder, "trainer", "train_sft_omni.py")):
        pytest.skip("set MINIMIND_O_REFERENCE to a checkout of jingyaogong/minimind-o (one with trainer/) to run the "
                    "side-by-side benchmark")
    done = subprocess.run([sys.executable, "benchmarks/bench_vs_reference.py", "step", "--reference", folder,
                           "--batch_size", "2", "--max_seq_len", "256", "--hidden_size", "64", "--num_hidden_layers", "2",
                           "--steps", "1", "--warmup", "0", "--tokenizer", tokenizer_folder()],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    *sides, ratios = [json.loads(line) for line in done.stdout.splitlines()]
    assert [s["side"] for s in sides] == ["reference", "ours", "ours_longest"]
    assert all(s["samples_per_s"] > 0 and s["tokens_per_s"] > 0 and s["peak_memory_mib"] > 0 for s in sides)
    assert sides[0]["width"] == sides[1]["width"] == 255 > sides[2]["width"]  # equal shapes; then cut to the longest
    assert set(ratios["vs_reference"]) == {"ours", "ours_longest"}


def test_a_run_shorter_than_log_every_logs_its_first_and_last_step(tmp_path, tokenizer_flag):
    data_file = data.write_demo_data(str(tmp_path / "rows16.parquet"), rows=16)
    summary = train.main(["--data", data_file, "--from_weight", "none", "--device", "cpu", "--max_steps", "3",
                          "--log_every", "10", "--save_every", "0", "--num_workers", "0", "--out_dir", str(tmp_path),
                          "--learning_rate", "1e-2", *TINY_RUN, *tokenizer_flag])
    records = [json.loads(line) for line in open(summary["metrics"])]
    assert [r["step"] for r in records] == [1, 3]
    assert summary["first_loss"] == records[0]["loss"] != summary["last_loss"] == records[-1]["loss"]


def test_a_row_whose_voice_embedding_is_not_numbers_is_a_bad_row(tmp_path):
    path = write(tmp_path / "nan_voice.parquet", dict(
        conversations=[chat("Hi", "Hello!")] * 2, question_audios=[[], []], answer_audios=[[codes(3)]] * 2,
        image_bytes=[[], []], ref_audios=[codes(6), codes(6)],
        spk_emb=[np.linspace(-1, 1, 192).tolist(), [0.0] * 191 + [float("nan")]]), FULL_TYPES)
    rows = data.ParquetRows([path])
    assert rows.read(0).spk_emb.shape == (192,)
    with pytest.raises(data.BadRow, match="nan_voice.parquet, row 1, column spk_emb: holds values that are not numbers"):
        rows.read(1)


@pytest.mark.parametrize("broken", ["loss", "gradient norm"])
def test_a_step_that_is_not_numbers_stops_the_run_and_keeps_the_last_good_weights(tmp_path, tokenizer_flag,
                                                                                    monkeypatch, broken):
    data_file = data.write_demo_data(str(tmp_path / "rows16.parquet"), rows=16)
    flags = ["--data", data_file, "--from_weight", "none", "--device", "cpu", "--max_steps", "2", "--save_every", "0",
             "--num_workers", "0", "--out_dir", str(tmp_path), *TINY_RUN, *tokenizer_flag]
    good = open(train.main(flags)["checkpoint"], "rb").read()
    if broken == "loss":
        real = mo.MiniMindO.forward
        monkeypatch.setattr(mo.MiniMindO, "forward",
                            lambda *a, **k: mo.Losses(*(x * float("nan") for x in real(*a, **k))))
    else:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(train.NotFinite, match=f"step 1: the {broken} is not a number .* the saved weights are"):
        train.main(flags)
    assert open(tmp_path / "sft_omni_64.pth", "rb").read() == good
