"""The model of minimind_o.py: shapes, the KV cache, injection, the loss, and weights on disk."""
import os

import pytest
import torch

import minimind_o as mo
import files
from conftest import tiny_config


def random_ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randint(0, mo.CODEBOOK_SIZE, (B, mo.N_CODEBOOKS, T), generator=g)
    text = torch.randint(20, 6400, (B, 1, T), generator=g)
    return torch.cat([audio, text], 1)


@pytest.mark.parametrize("use_moe", [False, True])
def test_forward_shapes(use_moe):
    model = mo.MiniMindO(tiny_config(use_moe=use_moe)).train()
    out = model(random_ids(2, 11))
    assert out.text_logits.shape == (2, 11, 6400)
    assert out.audio_logits.shape == (2, 8, 11, 2112)
    assert out.aux_loss.shape == () and (out.aux_loss > 0) == use_moe


@pytest.mark.parametrize("use_moe", [False, True])
def test_decode_steps_through_the_cache_match_the_full_forward(use_moe):
    """prefill, then one column at a time through each layer's KV cache, gives the logits of the whole
    sequence run at once (speaker slot included); speech_step gives the same audio logits as step."""
    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config(use_moe=use_moe)).eval()
    ids, spk = random_ids(1, 12), torch.randn(1, 192)
    ids[0, :, 3] = mo.SPEAKER_SLOT
    full = model(ids, spk_emb=spk)
    with torch.no_grad():
        model.setup_caches(12)
        text, audio = model.prefill(ids[..., :5], spk)
        torch.testing.assert_close(text, full.text_logits[:, 4], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(audio, full.audio_logits[:, :, 4], atol=1e-4, rtol=1e-4)
        for t in range(5, 12):
            text, audio = model.step(ids[..., t:t + 1], torch.tensor([t]), spk)
            torch.testing.assert_close(text, full.text_logits[:, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(audio, full.audio_logits[:, :, t], atol=1e-4, rtol=1e-4)
        model.setup_caches(12)
        model.prefill(ids[..., :5], spk)
        for t in range(5, 12):  # once the text has ended the Thinker stops at the bridge: the Talker is unchanged
            audio = model.speech_step(ids[..., t:t + 1], torch.tensor([t]), spk)
            torch.testing.assert_close(audio, full.audio_logits[:, :, t], atol=1e-4, rtol=1e-4)
    model.setup_caches(None)
    assert not any(k.endswith(("keys", "values", "slots")) for k in model.state_dict())  # caches are never saved


def test_injection_targets_first_placeholder_run_only():
    H, T = 4, 12
    ids = torch.tensor([[5, 16, 16, 16, 7, 16, 16, 8, 9, 9, 9, 9],      # run of 3, then another run
                        [16, 16, 16, 16, 16, 3, 3, 3, 3, 3, 3, 3],      # run of 5, only 2 features
                        [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])          # no placeholder at all
    h = torch.zeros(3, T, H)
    feats = torch.arange(1, 3 * 5 * H + 1, dtype=torch.float).view(3, 5, H)
    out = mo.inject(h, ids, 16, feats, torch.tensor([5, 2, 4]))
    changed = out.abs().sum(-1) > 0
    assert changed[0].tolist() == [False, True, True, True] + [False] * 8   # min(5 features, run of 3)
    assert torch.equal(out[0, 1:4], feats[0, :3])
    assert changed[1].tolist() == [True, True] + [False] * 10               # min(2 features, run of 5)
    assert torch.equal(out[1, :2], feats[1, :2])
    assert not changed[2].any()


def test_forward_injects_list_of_features_like_padded_batch():
    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config()).eval()
    ids = random_ids(2, 20)
    ids[0, mo.TEXT_ROW, 2:9] = mo.AUDIO_PLACEHOLDER
    ids[1, mo.TEXT_ROW, 4:6] = mo.AUDIO_PLACEHOLDER
    feats = [torch.randn(5, 512), torch.randn(3, 512)]
    a = model(ids, audio_embeds=feats)
    padded = torch.zeros(2, 5, 512)
    padded[0], padded[1, :3] = feats[0], feats[1]
    b = model(ids, audio_embeds=padded, audio_lengths=torch.tensor([5, 3]))
    torch.testing.assert_close(a.text_logits, b.text_logits)
    one = model(ids[1:], audio_embeds=[feats[1]])
    torch.testing.assert_close(a.text_logits[1:], one.text_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.text_logits, model(ids).text_logits)


def test_omni_loss_weights_stop_and_averages_layers():
    torch.manual_seed(0)
    B, T = 2, 6
    out = mo.OmniOutput(torch.randn(B, T, 6400), torch.randn(B, 8, T, 2112), torch.tensor(0.0))
    text_labels = torch.full((B, T), mo.IGNORE)
    text_labels[0, 2:4] = torch.tensor([7, 9])
    audio_labels = torch.full((B, 8, T), mo.IGNORE)
    audio_labels[:, 0, 1] = mo.AUDIO_STOP
    audio_labels[1, 0, 3] = 5
    audio_labels[0, 2, 5] = 11                     # a delayed layer's code where layer 0 has none
    text_loss, audio_loss = mo.omni_loss(out, text_labels, audio_labels)
    lp = out.text_logits.log_softmax(-1)
    assert torch.isclose(text_loss, -(lp[0, 2, 7] + lp[0, 3, 9]) / 2)
    la = out.audio_logits.log_softmax(-1)
    layer0 = -(10 * la[0, 0, 1, 2050] + 10 * la[1, 0, 1, 2050] + la[1, 0, 3, 5]) / 3
    assert torch.isclose(audio_loss, (layer0 - la[0, 2, 5, 11]) / 8)   # layers without labels add nothing
    empty = torch.full_like(text_labels, mo.IGNORE)
    assert mo.omni_loss(out, empty, torch.full_like(audio_labels, mo.IGNORE)) == (0, 0)


def test_parameter_counts_match_the_paper():
    dense = mo.parameter_counts(mo.MiniMindO())
    assert (round(dense["total"], 2), round(dense["thinker"], 2), round(dense["talker"], 2)) == (113.13, 63.91, 47.05)
    assert round(mo.parameter_counts(mo.MiniMindO(mo.OmniConfig(use_moe=True)))["total"], 2) == 314.89


# ---- weights on disk -------------------------------------------------------------------------

def test_save_load_round_trip_is_exact(tmp_path):
    model = mo.MiniMindO(tiny_config(use_moe=True)).half().float()  # fp16-representable weights
    path = str(tmp_path / "ckpt.pth")
    files.save_checkpoint(model, path)
    saved = torch.load(path)
    assert all(v.dtype == torch.float16 for v in saved.values())
    assert "model.embed_tokens.weight" in saved and "talker.lm_head.base.weight" in saved
    loaded = files.load_model(path)                       # config read off the shapes
    assert loaded.config.use_moe and loaded.config.num_hidden_layers == 4
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


class Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` cleanup runs."""


def test_a_save_killed_while_writing_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    import io
    path = str(tmp_path / "ckpt.pth")
    old = mo.MiniMindO(tiny_config())
    files.save_checkpoint(old, path)
    before = open(path, "rb").read()
    assert os.listdir(tmp_path) == ["ckpt.pth"]              # a finished save leaves no temporary file
    real_save = torch.save

    def killed_half_way(obj, f, *args, **kwargs):            # half the bytes reach the disk, then the kill
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[:len(buffer.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(half)
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(half)
        raise Killed

    monkeypatch.setattr(torch, "save", killed_half_way)
    torch.manual_seed(1)
    with pytest.raises(Killed):
        files.save_checkpoint(mo.MiniMindO(tiny_config()), path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    loaded = files.load_model(path)
    assert torch.equal(loaded.thinker.embed_tokens.weight, old.thinker.embed_tokens.weight.half().float())


def test_loader_names_missing_unexpected_and_misshaped_keys():
    """Strict loading (nn.Module.load_state_dict) names each key, under our names (thinker. for model.)."""
    model = mo.MiniMindO(tiny_config())
    sd = mo.official_state_dict(model)
    missing = dict(sd)
    del missing["talker.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"talker\.layers\.1\.mlp\.up_proj\.weight"'):
        model.load_official_state_dict(missing)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"talker\.extra"'):
        model.load_official_state_dict({**sd, "talker.extra": torch.zeros(1)})
    bad = {**sd, "model.norm.weight": torch.zeros(65)}
    with pytest.raises(RuntimeError, match=r"size mismatch for thinker\.norm\.weight.*\[65\].*\[64\]"):
        model.load_official_state_dict(bad)
    tied_absent = {k: v for k, v in sd.items() if k != "lm_head.weight"}   # Transformers folders omit it
    model.load_official_state_dict(tied_absent)


def test_missing_or_damaged_checkpoint_says_how_to_get_the_published_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no weights at .*nothing\.pth"):
        files.load_model(str(tmp_path / "nothing.pth"))
    with pytest.raises(FileNotFoundError, match=r"MiniMind-O weights: no weights at .*hf download jingyaogong/minimind-3o"):
        with files.loading("checkpoint", tmp_path):
            files.load_model(str(tmp_path))
    (tmp_path / "cut.pth").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(files.DamagedPartError, match=r"cannot read the MiniMind-O weights at .*cut\.pth.*hf download"):
        with files.loading("checkpoint", tmp_path / "cut.pth"):
            files.load_model(str(tmp_path / "cut.pth"))


def test_transformers_folder_with_config(tmp_path):
    import json
    from dataclasses import asdict
    from safetensors.torch import save_file
    cfg = tiny_config(num_hidden_layers=2)
    model = mo.MiniMindO(cfg)
    sd = {k: v.contiguous() for k, v in mo.official_state_dict(model).items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**asdict(cfg), "model_type": "minimind-o", "architectures": ["X"]}))
    loaded = files.load_model(str(tmp_path))
    assert loaded.config.num_hidden_layers == 2
    assert torch.equal(loaded.lm_head.weight, sd["model.embed_tokens.weight"].float())


# ---- rotary positions and the mixture of experts, against values worked out by hand --------------

def test_rope_turns_each_channel_pair_by_position_times_its_frequency():
    """head_dim 4, theta 100: pair (0, 2) turns 1 radian per position, pair (1, 3) 100^(-2/4) = 0.1.
    "Rotate half" turns (x_i, x_{i+2}) counter-clockwise: (x cos a - y sin a, y cos a + x sin a)."""
    import math
    cos, sin = mo.rope_tables(4, 3, 100.0)                                  # (3 positions, 4)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 3, 4)               # the same vector at positions 0, 1, 2
    out = mo.apply_rope(x, cos, sin)[0, 0]
    for p in range(3):
        a, b = p * 1.0, p * 0.1
        by_hand = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                   3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
        torch.testing.assert_close(out[p], torch.tensor(by_hand), atol=1e-6, rtol=0)
    # position 1 written out: pair (0, 2) = (1, 3) turned by 1 radian
    torch.testing.assert_close(out[1, [0, 2]], torch.tensor([-1.984111, 2.462377]), atol=1e-5, rtol=0)


def test_rope_tables_are_the_half_table_twice():
    cos, sin = mo.rope_tables(96, 5, 1e6)
    assert torch.equal(cos[:, :48], cos[:, 48:]) and torch.equal(sin[:, :48], sin[:, 48:])
    torch.testing.assert_close(sin[3, 1], torch.tensor(3 * 1e6 ** (-2 / 96)).sin())


# Four tokens, one-hot in the first four channels; router row e reads log p_t[e] there, so the router's
# probabilities are exactly these rows (each sums to 1).
ROUTER_PROBS = torch.tensor([[0.7, 0.1, 0.1, 0.1],     # -> expert 0
                             [0.1, 0.6, 0.2, 0.1],     # -> expert 1
                             [0.2, 0.5, 0.2, 0.1],     # -> expert 1
                             [0.1, 0.1, 0.1, 0.7]])    # -> expert 3
ROUTED_TO = [0, 1, 1, 3]


def scripted_moe():
    moe = mo.MiniMindO(tiny_config(use_moe=True)).thinker.layers[0].mlp
    assert isinstance(moe, mo.MoEFeedForward)
    dim = moe.gate.weight.shape[1]
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :4] = ROUTER_PROBS.log().T
    x = torch.eye(4, dim)[None]                                             # (1, 4 tokens, dim)
    return moe, x


def test_moe_sends_each_token_to_its_most_likely_expert():
    moe, x = scripted_moe()
    y, _ = moe.eval()(x)
    with torch.no_grad():
        for t, e in enumerate(ROUTED_TO):  # top-1 with the weight renormalised over the chosen expert: 1
            torch.testing.assert_close(y[0, t], moe.experts[e](x[0, t]), atol=1e-6, rtol=1e-5)
            others = [k for k in range(4) if k != e]
            assert all(not torch.allclose(y[0, t], moe.experts[k](x[0, t]), atol=1e-6) for k in others)


def test_moe_aux_loss_by_hand():
    """sum_e(share of tokens routed to e * mean router prob of e) * E * coef, spec section 1."""
    moe, x = scripted_moe()
    _, aux = moe.train()(x)
    share = torch.tensor([1, 2, 0, 1]) / 4                  # tokens per expert: 0, 1, 1, 3
    mean_prob = torch.tensor([0.275, 0.325, 0.15, 0.25])   # column means of ROUTER_PROBS
    by_hand = (share * mean_prob).sum() * 4 * 5e-4          # 0.29375 * 4 * 5e-4 = 5.875e-4
    assert by_hand.item() == pytest.approx(5.875e-4)
    assert aux.item() == pytest.approx(5.875e-4, rel=1e-5)
    _, aux_eval = moe.eval()(x)
    assert aux_eval.item() == 0                             # a training loss only
