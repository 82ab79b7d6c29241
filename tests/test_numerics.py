"""Small rules pinned by values worked out by hand: where RMSNorm's epsilon goes, the nucleus cut, the audio
repetition penalty's window, the speaker features' normalisation and the dtype a checkpoint is loaded in.
Each of these can be slipped by one line without changing any shape."""
import pytest
import torch
from torch import nn

import files
import minimind_o as mo
from conftest import tiny_config

NUCLEUS_DRAWS = 4000


def test_rmsnorm_adds_epsilon_to_the_mean_square_inside_the_root():
    norm = mo.RMSNorm(2, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    # x = (3, 4): mean square 12.5, plus eps 0.5 = 13 -> x / sqrt(13), times the weight (1, 2)
    expected = torch.tensor([3.0, 8.0]) / 13 ** 0.5
    assert torch.allclose(norm(torch.tensor([[3.0, 4.0]]))[0], expected)


def test_every_norm_of_the_model_takes_the_configs_epsilon():
    model = mo.MiniMindO(tiny_config(rms_norm_eps=0.25))
    norms = [m for m in model.modules() if isinstance(m, mo.RMSNorm)]
    assert norms and {m.eps for m in norms} == {0.25}


def test_the_nucleus_keeps_the_smallest_set_that_reaches_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: with top_p 0.7 the first two are kept (0.5 alone does not reach it),
    # renormalised to 0.625 and 0.375
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    unseen = torch.zeros(4, dtype=torch.bool)
    torch.manual_seed(0)
    draws = torch.stack([mo.sample_text(logits, unseen, 1.0, 0.7, 1.0, greedy=False) for _ in range(NUCLEUS_DRAWS)])
    counts = torch.bincount(draws, minlength=4) / NUCLEUS_DRAWS
    assert counts[2:].sum() == 0
    assert counts[0] == pytest.approx(0.625, abs=0.03) and counts[1] == pytest.approx(0.375, abs=0.03)


def test_the_temperature_sharpens_before_the_nucleus_cut():
    # temperature 0.5 squares the odds: 0.5, 0.3, 0.15, 0.05 become 0.25 : 0.09 : 0.0225 : 0.0025 (sum 0.365),
    # about 0.685, 0.247, 0.062, 0.007: top_p 0.9 keeps the first two (0.932 reaches it), not the third
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    unseen = torch.zeros(4, dtype=torch.bool)
    torch.manual_seed(0)
    draws = torch.stack([mo.sample_text(logits, unseen, 0.5, 0.9, 1.0, greedy=False) for _ in range(NUCLEUS_DRAWS)])
    counts = torch.bincount(draws, minlength=4) / NUCLEUS_DRAWS
    assert counts[2:].sum() == 0 and counts[0] == pytest.approx(0.25 / 0.34, abs=0.03)


def emitted(recent_steps_back):
    """Greedy codes of a step whose best code (5) was emitted by every layer that many steps before: the
    temperature makes 5 and 6 -0.5 and -0.51, and the 1.05 penalty pushes a recent 5 to -0.525."""
    steps = 2 * mo.AUDIO_PENALTY_WINDOW + mo.N_CODEBOOKS
    n = steps - 1
    codes = torch.full((mo.N_CODEBOOKS, steps), 7, dtype=torch.long)
    codes[:, n - recent_steps_back] = 5
    logits = torch.full((mo.N_CODEBOOKS, mo.AUDIO_VOCAB), -1.0)
    logits[:, 5], logits[:, 6] = -0.100, -0.102
    stop_at = torch.full((mo.N_CODEBOOKS,), steps)
    mo.emit_codes(codes, n, logits, stop_at, greedy=True)
    return codes[:, n]


def test_the_audio_penalty_counts_the_last_three_codes_of_each_layer_and_no_older_one():
    assert mo.AUDIO_PENALTY_WINDOW == 3
    for back in (1, 2, 3):
        assert (emitted(back) == 6).all(), f"a code {back} steps back is penalised"
    assert (emitted(4) == 5).all(), "a code 4 steps back is not"


def test_speaker_features_are_zero_mean_over_time_in_every_mel_band():
    torch.manual_seed(0)
    wav = torch.randn(mo.SAMPLE_RATE_SPEECH).numpy() * 0.1
    feats = mo.speaker_features(wav)                                          # (T, 80)
    assert feats.shape[1] == mo.SPK_MEL["n_mels"]
    assert torch.allclose(feats.mean(dim=0), torch.zeros(feats.shape[1]), atol=1e-4)
    assert feats.mean(dim=1).abs().max() > 0.1    # each frame keeps its own level against the others


class FixedEmbedding(nn.Module):
    """A stand-in for CAM++ whose embedding is (3, 4, 0, ...): length 5."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, feats):
        out = torch.zeros(feats.shape[0], mo.SPK_EMBED_DIM)
        out[:, 0], out[:, 1] = 3.0, 4.0
        return out * self.scale


def test_the_speaker_embedding_is_cam_plus_plus_output_as_it_is_not_length_normalised():
    torch.manual_seed(0)
    embedding = mo.speaker_embedding(FixedEmbedding(), torch.randn(mo.SAMPLE_RATE_SPEECH).numpy() * 0.1)
    assert embedding.dtype == torch.float32 and embedding.norm() == pytest.approx(5.0)


def test_a_checkpoint_loads_in_the_dtype_asked_for_with_its_float16_values(tmp_path):
    torch.manual_seed(0)
    model = mo.MiniMindO(tiny_config())
    path = tmp_path / "model.pth"  # a Path, as a caller of the library passes it
    files.save_checkpoint(model, path)                       # the release's layout: float16 on disk
    config = model.config
    as_float32 = files.load_model(path, config=config)
    as_bfloat16 = files.load_model(path, dtype=torch.bfloat16, config=config)
    assert {p.dtype for p in as_float32.parameters()} == {torch.float32}
    assert {p.dtype for p in as_bfloat16.parameters()} == {torch.bfloat16}
    weight = model.thinker.layers[0].self_attn.q_proj.weight
    loaded = as_float32.thinker.layers[0].self_attn.q_proj.weight
    assert torch.equal(loaded, weight.half().float())        # float16 values, exactly, in float32
    assert torch.equal(as_bfloat16.thinker.layers[0].self_attn.q_proj.weight, weight.half().bfloat16())
