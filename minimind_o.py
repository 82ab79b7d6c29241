"""
MiniMind-O: a speech-native omni model in one readable file.

It listens (speech), sees (images) and reads (text), and answers in text and streaming speech.
Two transformers share the work (the "Thinker-Talker" design of arXiv 2605.03937):

    text ids ──► Thinker (8 MiniMind blocks) ──► text logits
                     │ hidden state after block 4 (the "bridge")
                     ▼
    audio ids ─► Talker (4 MiniMind blocks) ──► 8 x Mimi codebook logits

A training sample or a generation step is a column of NINE ids: rows 0-7 are the 8 Mimi codebook
layers (each delayed one step more than the last), row 8 is the text token. Speech questions and
images enter the Thinker through frozen encoders (SenseVoice, SigLIP2) whose features replace
placeholder tokens. Speech leaves through the Mimi codec, one 80 ms frame of 8 codes at a time.

Read top to bottom, in the order data flows:
  1. ids and config                  7. Talker (codec embedding/head, bridge, speaker slot)
  2. RMSNorm, RoPE, KV cache         8. MiniMindO: training forward, decode step, and the loss
  3. attention                       9. weights in the published layout
  4. SwiGLU FFN and MoE             10. tokenizer, chat text and the nine-row sample
  5. block and Thinker              11. streaming generation
  6. projectors and injection       12. thin adapters to the frozen side modules

The binding facts (weight layout, token layout, delays, sampling, loss) are written down in
../shared/spec/conformance.md and checked by ../shared/checks/conformance.py against fixtures from the
public reference implementation.
"""
import itertools
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------
# 1. Ids and config
# -----------------------------------------------------------------------------------------------

# Text ids in the released MiniMind tokenizer.
TEXT_PAD = 0            # <|endoftext|>, also what follows the reply once text is done
IM_START = 1            # <|im_start|>
IM_END = 2              # <|im_end|>: end of a turn, the text EOS
IMAGE_PLACEHOLDER = 12  # <|image_pad|>: one per image token, replaced by vision features
AUDIO_PLACEHOLDER = 16  # <|audio_pad|>: one per speech frame, replaced by speech features
NEWLINE = 234           # "\n": the text input right after EOS (what the training data has there)

# Audio ids: Mimi codes 0..2047, then a few specials, in a vocabulary of 2112.
N_CODEBOOKS = 8         # Mimi codebook layers we model (rows 0-7 of a sample)
TEXT_ROW = N_CODEBOOKS  # row 8 of a sample is the text
N_ROWS = N_CODEBOOKS + 1  # nine rows per column
CODEBOOK_SIZE = 2048    # ids >= this are not sound
AUDIO_PAD = 2049        # "no audio here"
AUDIO_STOP = 2050       # the end of a layer's speech
SPEAKER_SLOT = 2051     # position whose codec embedding is replaced by the speaker embedding
AUDIO_VOCAB = 2112      # codes + specials, rounded up (the codec embedding/head size)
TEXT_VOCAB = 6400       # the MiniMind tokenizer
IGNORE = -100           # label value that has no loss

IMAGE_TOKENS = 64       # a SigLIP2 image is 64 tokens
SPEECH_EMBED_DIM = 512  # SenseVoice-Small's output width
IMAGE_EMBED_DIM = 768   # SigLIP2's output width
SPK_EMBED_DIM = 192     # CAM++ speaker embedding


@dataclass
class OmniConfig:
    """Model shape. Field names and defaults are those of the release's config.json."""
    hidden_size: int = 768                   # Thinker width H
    num_hidden_layers: int = 8
    use_moe: bool = False
    vocab_size: int = TEXT_VOCAB
    num_attention_heads: int = 8
    num_key_value_heads: int = 4             # grouped-query attention: 2 query heads per kv head
    head_dim: Optional[int] = None           # default H / heads
    intermediate_size: Optional[int] = None  # default ceil(H*pi/64)*64
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    inference_rope_scaling: bool = False     # YaRN, for prompts longer than 2048
    num_experts: int = 4
    num_experts_per_tok: int = 1
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 5e-4
    talker_hidden_size: int = 768            # Talker width d
    num_talker_hidden_layers: int = 4
    audio_hidden_size: int = SPEECH_EMBED_DIM
    image_hidden_size: int = IMAGE_EMBED_DIM
    image_token_len: int = IMAGE_TOKENS      # kept for the release's config.json; the code uses IMAGE_TOKENS
    audio_vocab_size: int = AUDIO_VOCAB
    spk_emb_size: int = SPK_EMBED_DIM
    bridge_layer: Optional[int] = None       # default num_hidden_layers // 2 - 1

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.intermediate_size = self.intermediate_size or ffn_width(self.hidden_size)
        if self.bridge_layer is None:
            self.bridge_layer = self.num_hidden_layers // 2 - 1


def ffn_width(dim):
    """SwiGLU width used by MiniMind: about pi * dim, rounded up to a multiple of 64."""
    return math.ceil(dim * math.pi / 64) * 64


@dataclass
class BlockShape:
    """What differs between the Thinker's blocks and the Talker's. What they share (the norm's eps, the
    kind of feed-forward) is read from the OmniConfig."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int


def thinker_shape(cfg):
    return BlockShape(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim, cfg.intermediate_size)


TALKER_HEADS, TALKER_KV_HEADS = 8, 4  # the release builds the Talker from a default MiniMind config of width d


def talker_shape(cfg):
    d = cfg.talker_hidden_size
    return BlockShape(d, cfg.num_talker_hidden_layers, TALKER_HEADS, TALKER_KV_HEADS, d // TALKER_HEADS, ffn_width(d))

# -----------------------------------------------------------------------------------------------
# 2. RMSNorm, rotary positions, KV cache
# -----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 whatever the model's dtype: x^2 overflows in float16, bfloat16's mean of squares is inaccurate
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).type_as(x)


def rope_tables(head_dim, max_pos, theta, yarn=False, factor=16, original_max=2048, beta_fast=32, beta_slow=1):
    """cos/sin tables (max_pos, head_dim) for "rotate half" RoPE: the half-table concatenated twice. YaRN (for
    inference beyond the trained length) slows the low-frequency dimensions by `factor`, leaves the
    high-frequency ones alone, and ramps linearly in between."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim/2,)
    if yarn and max_pos > original_max:
        def dim_of(n_rotations):  # which dimension turns n_rotations times over original_max positions
            return head_dim * math.log(original_max / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(dim_of(beta_fast)), 0)
        high = min(math.ceil(dim_of(beta_slow)), head_dim // 2 - 1)
        ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs * (1 - ramp + ramp / factor)
    angles = torch.outer(torch.arange(max_pos).float(), freqs)  # (max_pos, head_dim/2)
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, heads, T, head_dim); cos/sin: (T, head_dim). Rotates each (i, i + head_dim/2) pair."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache(nn.Module):
    """One attention layer's keys and values for one conversation, preallocated to max_len positions. A step
    writes its new position in place: nothing is concatenated or copied, a step costs the same at position 10
    as at position 1000 (apart from attention itself), and the shapes never change, so a compiled decode step
    (CUDA graphs) can be replayed. Buffers, not parameters: never saved."""

    def __init__(self, n_kv_heads, head_dim, max_len, dtype, device):
        super().__init__()
        shape = (1, n_kv_heads, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    def update(self, pos, k, v):
        """k, v: (1, kv_heads, T, head_dim) at positions pos (T,) -> every slot's keys and values."""
        self.keys.index_copy_(2, pos, k)
        self.values.index_copy_(2, pos, v)
        return self.keys, self.values                                 # (1, kv_heads, max_len, head_dim)


# -----------------------------------------------------------------------------------------------
# 3. Attention: grouped kv heads, q/k RMSNorm, RoPE, causal
# -----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, s: BlockShape, eps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.dim, s.n_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.dim, s.n_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.dim, s.n_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, s.dim, bias=False)
        # Normalising q and k per head keeps attention logits bounded (stable training at small size).
        self.q_norm = RMSNorm(s.head_dim, eps)
        self.k_norm = RMSNorm(s.head_dim, eps)
        self.kv_cache = None  # a KVCache while generating (MiniMindO.setup_caches)

    def forward(self, x, cos, sin, pos=None):
        """x: (B, T, dim) -> (B, T, dim). pos (T,) only when generating: this layer's cache keeps the
        new keys and values at those positions."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pos is not None:
            keys, values = self.kv_cache.update(pos, k, v)
        if pos is None or T > 1:  # training, or a whole prompt (it starts at position 0): causal over itself
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:                     # one new position: it sees the slots up to its own (later ones are unwritten)
            visible = self.kv_cache.slots <= pos[:, None]                                    # (1, max_len)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# -----------------------------------------------------------------------------------------------
# 4. Feed-forward: SwiGLU, and the mixture of experts built from it
# -----------------------------------------------------------------------------------------------

class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Each token goes to its top-k experts (k = 1 in the release), weighted by the router."""

    def __init__(self, s: BlockShape, cfg: OmniConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.aux_loss_coef = cfg.router_aux_loss_coef
        self.gate = nn.Linear(s.dim, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(FeedForward(s.dim, s.ffn_dim) for _ in range(cfg.num_experts))

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)                                               # (N, D) tokens
        probs = F.softmax(self.gate(x), dim=-1)                            # (N, E)
        weight, expert = probs.topk(self.top_k, dim=-1)                    # (N, k)
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        # Sort the (token, choice) pairs by expert so that each expert runs once on one slice.
        order = expert.flatten().argsort()                                 # (N*k,)
        token = order // self.top_k
        counts = torch.bincount(expert.flatten(), minlength=len(self.experts)).tolist()  # one sync per layer
        outs = [ffn(chunk) for ffn, chunk in zip(self.experts, x[token].split(counts))]
        y = torch.zeros_like(x).index_add_(0, token, torch.cat(outs) * weight.flatten()[order, None].to(x.dtype))
        aux = x.new_zeros(())
        if self.training and self.aux_loss_coef > 0:
            # Load balance: (share of tokens sent to e) * (mean router prob of e), summed, x E.
            share = F.one_hot(expert, len(self.experts)).float().mean(0)   # (k, E)
            aux = (share * probs.mean(0)).sum() * len(self.experts) * self.aux_loss_coef
        return y.view(B, T, D), aux


# -----------------------------------------------------------------------------------------------
# 5. Block, and the Thinker (a MiniMind decoder that also hands over its middle layer)
# -----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, s: BlockShape, cfg: OmniConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(s.dim, cfg.rms_norm_eps)
        self.self_attn = Attention(s, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.dim, cfg.rms_norm_eps)
        self.mlp = MoEFeedForward(s, cfg) if cfg.use_moe else FeedForward(s.dim, s.ffn_dim)

    def forward(self, h, cos, sin, pos=None):
        """h: (B, T, dim) -> (B, T, dim), and the MoE load-balance loss (0 for a dense block)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, pos)
        if isinstance(self.mlp, MoEFeedForward):
            out, aux = self.mlp(self.post_attention_layernorm(h))
            return h + out, aux
        return h + self.mlp(self.post_attention_layernorm(h)), h.new_zeros(())


class BlockStack(nn.Module):
    """n blocks with their own RoPE table and final norm. The Thinker and the Talker are each one."""
    checkpointing = False  # train.py --grad_checkpointing: keep only block inputs, recompute the rest in backward

    def __init__(self, s: BlockShape, cfg: OmniConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(s, cfg) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.dim, cfg.rms_norm_eps)
        cos, sin = rope_tables(s.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.inference_rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_pos, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)

    def run(self, h, blocks, pos=None):
        """h: (B, T, dim) through `blocks` (some of self.layers) -> (h, summed MoE loss). pos (T,): the
        positions when generating (cached); None: a whole sequence from position 0 (training)."""
        positions = torch.arange(h.shape[1], device=h.device) if pos is None else pos
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        aux = h.new_zeros(())
        for block in blocks:
            run = partial(checkpoint, block, use_reentrant=False) if self.checkpointing and self.training else block
            h, block_aux = run(h, cos, sin, pos)
            aux = aux + block_aux
        return h, aux


class Thinker(BlockStack):
    def __init__(self, cfg: OmniConfig):
        super().__init__(thinker_shape(cfg), cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.bridge_layer = cfg.bridge_layer

    def lower(self, h, pos=None):
        """Blocks 0..bridge_layer -> the bridge the Talker reads (before any norm), MoE loss."""
        return self.run(h, self.layers[:self.bridge_layer + 1], pos)

    def upper(self, bridge, pos=None):
        """The remaining blocks and the final norm -> the hidden state the text head reads, MoE loss."""
        h, aux = self.run(bridge, self.layers[self.bridge_layer + 1:], pos)
        return self.norm(h), aux


# -----------------------------------------------------------------------------------------------
# 6. Projectors, and placeholder injection of encoder features
# -----------------------------------------------------------------------------------------------

class Projector(nn.Module):
    """Frozen-encoder features (speech 512-d, image 768-d) -> Thinker width H."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.mlp(x)


def pad_features(feats, dim, device, lengths=None):
    """Per-sample features -> (B, L, dim) padded on `device`, (B,) lengths. feats: a list of (L_i, dim) tensors or
    None, or (B, L, dim) padded already, as collate functions hand it (lengths: (B,), or all L when None)."""
    if torch.is_tensor(feats):
        lengths = torch.full(feats.shape[:1], feats.shape[1]) if lengths is None else lengths
        return feats.to(device), lengths.to(device)
    lengths = torch.tensor([0 if f is None else f.shape[0] for f in feats], device=device)
    empty = torch.zeros(0, dim, device=device)
    padded = nn.utils.rnn.pad_sequence([empty if f is None else f.to(device) for f in feats], batch_first=True)
    if padded.shape[1] == 0:
        padded = padded.new_zeros(len(feats), 1, dim)
    return padded, lengths


def inject(h, ids, placeholder, feats, lengths):
    """Put feats[b, :n] on the first run of `placeholder` in ids[b], n = min(lengths[b], run length).
    h: (B, T, H) token embeddings; ids: (B, T); feats: (B, L, H); lengths: (B,). Every sample's run is found
    with tensor ops, no Python loop over samples."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    is_ph = ids == placeholder
    first = is_ph.int().argmax(1, keepdim=True)                        # (B, 1) start of the first run
    after_run = ~is_ph & (pos > first)                                 # non-placeholders after it
    run_end = torch.where(after_run.any(1, keepdim=True), after_run.int().argmax(1, keepdim=True), T)
    n = torch.minimum(lengths[:, None], run_end - first) * is_ph.any(1, keepdim=True)
    take = (pos >= first) & (pos < first + n)                          # (B, T) positions to overwrite
    src = (pos - first).clamp(0, feats.shape[1] - 1)                   # which feature row lands there
    gathered = feats.gather(1, src[..., None].expand(B, T, feats.shape[-1]))
    return torch.where(take[..., None], gathered.to(h.dtype), h)


# -----------------------------------------------------------------------------------------------
# 7. Talker: 8 codebooks in, 8 codebooks out, steered by the Thinker's middle layer
# -----------------------------------------------------------------------------------------------

class CodecEmbedding(nn.Module):
    """A frame of 8 codes -> one vector: mean over layers of (shared table + that layer's adapter). The shared
    table lets layers share what a code means; the small adapters (rank 256) let each layer's differ a little."""

    def __init__(self, vocab, dim, rank=256):
        super().__init__()
        self.base = nn.Embedding(vocab, dim)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Embedding(vocab, rank), nn.GELU(), nn.Linear(rank, dim, bias=False)) for _ in range(N_CODEBOOKS))

    def forward(self, codes):  # (B, 8, T) -> (B, T, d)
        shared = self.base(codes).sum(1)
        per_layer = sum(adapter(codes[:, i]) for i, adapter in enumerate(self.adapters))
        return (shared + per_layer) / N_CODEBOOKS


class CodecHead(nn.Module):
    """Hidden state -> logits for each of the 8 codebooks: shared projection + per-layer adapter."""

    def __init__(self, dim, vocab, rank=256):
        super().__init__()
        self.base = nn.Linear(dim, vocab, bias=False)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, rank, bias=False), nn.GELU(), nn.Linear(rank, vocab, bias=False)) for _ in range(N_CODEBOOKS))

    def forward(self, h):  # (B, ..., d) -> (B, 8, ..., vocab)
        shared = self.base(h)
        return torch.stack([shared + adapter(h) for adapter in self.adapters], dim=1)


def mlp_to_norm(in_dim, mid_dim, out_dim, eps):
    """Linear -> GELU -> Linear -> RMSNorm: how both Talker inputs are brought to the same scale."""
    return nn.Sequential(nn.Linear(in_dim, mid_dim), nn.GELU(), nn.Linear(mid_dim, out_dim), RMSNorm(out_dim, eps))


class Talker(BlockStack):
    def __init__(self, cfg: OmniConfig):
        s = talker_shape(cfg)
        super().__init__(s, cfg)
        d, H = s.dim, cfg.hidden_size
        self.embed_tokens = CodecEmbedding(cfg.audio_vocab_size, d)
        self.lm_head = CodecHead(d, cfg.audio_vocab_size)
        self.codec_proj = mlp_to_norm(d, d, d, cfg.rms_norm_eps)
        self.embed_proj = mlp_to_norm(H, H, d, cfg.rms_norm_eps)  # the semantic bridge from the Thinker
        # Learnable mixing scales; the bridge starts 3x louder so early training listens to the text.
        self.text_scale = nn.Parameter(torch.tensor(3.0))
        self.audio_scale = nn.Parameter(torch.tensor(1.0))
        self.spk_proj = nn.Linear(cfg.spk_emb_size, d, bias=False)

    def forward(self, bridge, codes, spk_emb=None, pos=None):
        """bridge: (B, T, H) Thinker middle layer; codes: (B, 8, T) -> hidden (B, T, d) for the codec
        head, MoE loss. spk_emb: (B, 192), put where layer 0 holds the speaker slot id."""
        codec = self.embed_tokens(codes)                                       # (B, T, d)
        if spk_emb is not None:  # the speaker slot holds the voice's embedding instead of a code
            slot = (codes[:, 0] == SPEAKER_SLOT)[..., None]
            codec = torch.where(slot, self.spk_proj(spk_emb.to(codec.dtype))[:, None], codec)
        h = self.embed_proj(bridge) * self.text_scale + self.codec_proj(codec) * self.audio_scale
        h, aux = self.run(h, self.layers, pos)
        return self.norm(h), aux


# -----------------------------------------------------------------------------------------------
# 8. The whole model: the training forward, the decode step, and the loss
# -----------------------------------------------------------------------------------------------
# `forward` runs whole sequences: every position's logits (what `omni_loss` reads), or with labels the Losses
# training minimises, omni_loss's values for less work (heads only where labels are, upper blocks cut short).
# Generation runs `prefill` once on the prompt, then one column per step through `step`, or `speech_step` once the
# text has ended (the Thinker then stops at the bridge). Both are tensor-only: each attention layer keeps its own
# KVCache, set up by `setup_caches`.

class OmniOutput(NamedTuple):
    text_logits: torch.Tensor   # (B, T, vocab)
    audio_logits: torch.Tensor  # (B, 8, T, audio_vocab)
    aux_loss: torch.Tensor      # MoE load-balance loss (0 for the dense model or in eval)


class Losses(NamedTuple):
    """What a labelled forward returns (see labelled_losses); training minimises their sum."""
    text: torch.Tensor   # mean cross-entropy over the labelled text positions
    audio: torch.Tensor  # per codebook layer the weighted mean over its labels, then the mean over the 8 layers
    aux: torch.Tensor    # MoE load-balance loss (0 for the dense model)


class MiniMindO(nn.Module):
    def __init__(self, cfg: OmniConfig = None):
        super().__init__()
        self.config = cfg = cfg or OmniConfig()
        self.thinker = Thinker(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.thinker.embed_tokens.weight  # tied: one matrix reads and writes text
        self.talker = Talker(cfg)
        self.audio_proj = Projector(cfg.audio_hidden_size, cfg.hidden_size)
        self.vision_proj = Projector(cfg.image_hidden_size, cfg.hidden_size)
        self.apply(init_weights)
        self.width_multiple = 1  # train.py --compile: a labelled forward's upper blocks see few widths, multiples of it

    def forward(self, input_ids, audio_embeds=None, image_embeds=None, spk_emb=None, audio_lengths=None,
                text_labels=None, audio_labels=None):
        """input_ids: (B, 9, T), rows 0-7 audio layers, row 8 text -> OmniOutput for every position; with text_labels
        (B, T) and audio_labels (B, 8, T), the Losses instead. audio_embeds / image_embeds: per sample (L_i, 512) /
        (64, 768) encoder outputs or None, or padded (pad_features; audio_lengths: (B,)); spk_emb: (B, 192)."""
        width = input_ids.shape[-1]  # how far the upper blocks run; first, so its host sync waits for no queued block
        if text_labels is not None and not self.config.use_moe:  # a MoE's load-balance loss averages over all T
            # only the text head reads them; causal, the positions through the batch's last text label are unchanged
            labelled = (text_labels != IGNORE).any(0).nonzero()      # (n, 1): positions where some sample has one
            last = int(labelled[-1]) if len(labelled) else 0
            width = min(width, math.ceil((last + 1) / self.width_multiple) * self.width_multiple)
        codes, text = input_ids[:, :N_CODEBOOKS], input_ids[:, TEXT_ROW]
        bridge, lower_aux = self.thinker.lower(self.embed(text, audio_embeds, image_embeds, audio_lengths))  # (B, T, H)
        talk, talker_aux = self.talker(bridge, codes, spk_emb)                              # (B, T, d)
        # contiguous: strides that depend on width alone, as --compile's graphs expect
        hidden, upper_aux = self.thinker.upper(bridge[:, :width].contiguous())              # (B, width, H)
        if text_labels is None:
            return OmniOutput(self.lm_head(hidden), self.talker.lm_head(talk), lower_aux + upper_aux + talker_aux)
        losses = labelled_losses(self.lm_head, hidden, self.talker.lm_head, talk, text_labels[:, :width], audio_labels)
        return Losses(*losses, lower_aux + upper_aux + talker_aux)

    def embed(self, text, audio_embeds=None, image_embeds=None, audio_lengths=None):
        """Text ids (B, T) -> (B, T, H) embeddings, encoder features put on their placeholders."""
        h = self.thinker.embed_tokens(text)
        if audio_embeds is not None:
            feats, lengths = pad_features(audio_embeds, self.config.audio_hidden_size, h.device, audio_lengths)
            h = inject(h, text, AUDIO_PLACEHOLDER, self.audio_proj(feats.to(h.dtype)), lengths)
        if image_embeds is not None:
            feats, lengths = pad_features(image_embeds, self.config.image_hidden_size, h.device)
            h = inject(h, text, IMAGE_PLACEHOLDER, self.vision_proj(feats.to(h.dtype)), lengths)
        return h

    def setup_caches(self, max_len):
        """Give every attention layer (Thinker and Talker) a KV cache for one conversation of max_len
        positions; max_len=None frees them. One generation at a time per model."""
        dtype, device = self.thinker.embed_tokens.weight.dtype, self.thinker.embed_tokens.weight.device
        for attn in (m for m in self.modules() if isinstance(m, Attention)):
            attn.kv_cache = None if max_len is None else KVCache(attn.n_kv_heads, attn.head_dim, max_len, dtype, device)

    def prefill(self, input_ids, spk_emb=None, audio_embeds=None, image_embeds=None):
        """The prompt (1, 9, P), from position 0, into the caches -> text logits (1, vocab) and audio
        logits (1, 8, audio_vocab) of its last position."""
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device)
        h = self.embed(input_ids[:, TEXT_ROW], audio_embeds, image_embeds)
        return self.decode(h, input_ids[:, :N_CODEBOOKS], spk_emb, pos)

    def step(self, column, pos, spk_emb=None):
        """One column (1, 9, 1) at position pos (1,) -> text logits (1, vocab), audio logits (1, 8, audio_vocab)."""
        return self.decode(self.thinker.embed_tokens(column[:, TEXT_ROW]), column[:, :N_CODEBOOKS], spk_emb, pos)

    def speech_step(self, column, pos, spk_emb=None):
        """A step once the text has ended -> audio logits (1, 8, audio_vocab) only."""
        bridge, _ = self.thinker.lower(self.thinker.embed_tokens(column[:, TEXT_ROW]), pos)
        return self.speak(bridge, column[:, :N_CODEBOOKS], spk_emb, pos)

    def decode(self, h, codes, spk_emb, pos):
        bridge, _ = self.thinker.lower(h, pos)
        hidden, _ = self.thinker.upper(bridge, pos)
        return self.lm_head(hidden[:, -1]), self.speak(bridge, codes, spk_emb, pos)

    def speak(self, bridge, codes, spk_emb, pos):
        talk, _ = self.talker(bridge, codes, spk_emb, pos)
        return self.talker.lm_head(talk[:, -1])                                 # (1, 8, audio_vocab)

    def load_official_state_dict(self, state_dict):
        """Load release-named weights (section 9) strictly: PyTorch names every missing, unexpected or
        mis-shaped key (under our names: `thinker.` for the release's `model.`)."""
        ours = {re.sub(r"^model\.", "thinker.", k): v for k, v in state_dict.items()}
        if "lm_head.weight" not in ours and "thinker.embed_tokens.weight" in ours:
            ours["lm_head.weight"] = ours["thinker.embed_tokens.weight"]  # tied; folders may leave it out
        self.load_state_dict(ours)
        return self


def init_weights(module):
    """The release's initialisation (transformers' default): N(0, 0.02) weights, zero biases. PyTorch's
    N(0, 1) embedding would make the tied output layer start with huge logits (text loss ~50, not ~8.8)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


STOP_WEIGHT = 10.0  # the stop id's weight in the audio loss: one id per layer per reply, so it counts more
HEAD_CHUNK = 1024   # positions per head call: (1024, 8, 2112) float32 audio logits are 69 MB


def labelled_losses(text_head, text_h, audio_head, audio_h, text_labels, audio_labels, stop_weight=STOP_WEIGHT):
    """(text loss, audio loss) of the heads on text_h (B, T', ...) and audio_h (B, T, ...) for labels (B, T') and
    (B, 8, T), IGNORE where nothing is learned; each head runs only where its labels are. text: the mean
    cross-entropy. audio: per layer the mean over its labels, the stop id weighing `stop_weight` (so the model
    learns to end speech), then the mean over the 8 layers."""
    text_at, audio_at = text_labels != IGNORE, (audio_labels != IGNORE).any(1)  # (B, T'), (B, T)
    text_loss = head_loss(text_head, text_h[text_at], text_labels[text_at])
    codes = audio_labels.transpose(1, 2)[audio_at]                              # (N, 8) labels
    return text_loss, head_loss(audio_head, audio_h[audio_at], codes, stop_weight).mean()


def head_loss(head, h, labels, stop_weight=1.0):
    """h (N, ...) at N labelled positions, labels (N,) or (N, 8) -> mean cross-entropy of head(h) over the labels,
    per codebook for (N, 8) (0 where none, not NaN), the stop id weighing stop_weight. A chunk of HEAD_CHUNK
    positions at a time, its logits recomputed in the backward pass, not kept."""
    def chunk_loss(h, labels):
        ce = F.cross_entropy(head(h).flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
        return (ce.view_as(labels) * torch.where(labels == AUDIO_STOP, stop_weight, 1.0)).sum(0)
    chunks = zip(h.split(HEAD_CHUNK), labels.split(HEAD_CHUNK))
    summed = sum(checkpoint(chunk_loss, *chunk, use_reentrant=False) for chunk in chunks)
    return summed / (labels != IGNORE).sum(0).clamp_min(1)


def omni_loss(out, text_labels, audio_labels, stop_weight=STOP_WEIGHT):
    """(text loss, audio loss) of an OmniOutput for labels (B, T) and (B, 8, T): labelled_losses of logits."""
    logits, audio_logits = nn.Identity(), out.audio_logits.transpose(1, 2)     # the heads applied; (B, T, 8, V)
    return labelled_losses(logits, out.text_logits, logits, audio_logits, text_labels, audio_labels, stop_weight)


# -----------------------------------------------------------------------------------------------
# 9. Weights in the published layout
# -----------------------------------------------------------------------------------------------
# The release names the Thinker `model.`; everything else has the same name here. Reading and writing
# the checkpoint files (float16 .pth files, Transformers-format folders) is files.py's work.

def official_state_dict(model, dtype=torch.float16):
    """Our weights under the release's names, on the CPU, in the release's dtype."""
    return {re.sub(r"^thinker\.", "model.", k): v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}


def parameter_counts(model):
    """Millions of parameters the way the paper counts them (the tied embedding once)."""
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    return {"thinker": count(model.thinker), "talker": count(model.talker),
            "projectors": count(model.audio_proj) + count(model.vision_proj), "total": count(model)}


# -----------------------------------------------------------------------------------------------
# 10. Tokenizer, chat text, and the nine-row training sample
# -----------------------------------------------------------------------------------------------

EMPTY_THINK = "<think>\n\n</think>\n\n"  # the reply's (empty) reasoning block
THINK_END = "</think>\n\n"
IMAGE_MARK = "<image>"                   # where an image goes in the released conversations
ROLES = ("system", "user", "assistant")
REPLY_SEARCH = 50  # how far after the reply start to look for "</think>\n\n"


def load_tokenizer(path):
    """The released MiniMind tokenizer (a folder with tokenizer.json, or the file itself)."""
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"tokenizer not found: {file}")
    return Tokenizer.from_file(file)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def render_chat(messages, add_generation_prompt=False):
    """ChatML with an empty think block before every reply (the release's template)."""
    parts = []
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        think = EMPTY_THINK if m["role"] == "assistant" else ""
        parts.append(f"<|im_start|>{m['role']}\n{think}{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append(f"<|im_start|>assistant\n{EMPTY_THINK}")
    return "".join(parts)


def place_audio(content, n_tokens, layout):
    pads = "<|audio_pad|>" * n_tokens
    return {"audio_only": pads, "text_only": content, "audio_blankline_text": f"{pads}\n\n{content}",
            "text_blankline_audio": f"{content}\n\n{pads}"}[layout]


def expand_image_marks(text):
    """Each <image> mark becomes the 64 <|image_pad|> tokens its vision features will replace."""
    return text.replace(IMAGE_MARK, "<|image_pad|>" * IMAGE_TOKENS)


def place_image(content, layout):
    text = content.replace(IMAGE_MARK, "").strip()
    return {"image_newline_text": f"{IMAGE_MARK}\n{text}", "image_blankline_text": f"{IMAGE_MARK}\n\n{text}",
            "text_newline_image": f"{text}\n{IMAGE_MARK}", "text_blankline_image": f"{text}\n\n{IMAGE_MARK}"}[layout]


def frames_of(flat_codes):
    """Flattened frame-major codes (8 per frame) -> (8, F); a trailing partial frame is dropped."""
    codes = torch.as_tensor(flat_codes, dtype=torch.long).flatten()
    n = codes.numel() // N_CODEBOOKS
    return codes[:n * N_CODEBOOKS].view(n, N_CODEBOOKS).T


def find(seq, pattern, start=0, stop=math.inf):
    """Index of the first occurrence of `pattern` in seq[start:stop], or -1."""
    for i in range(start, min(stop, len(seq) - len(pattern) + 1)):
        if seq[i:i + len(pattern)] == pattern:
            return i
    return -1


def last_reply(ids, tok):
    """(start, end) of the last assistant reply, or None: start just after `<|im_start|>assistant\n`, end at
    its `<|im_end|>\n` (or the end of the ids when truncated). Earlier replies are context only."""
    head, tail = encode(tok, "<|im_start|>assistant\n"), encode(tok, "<|im_end|>\n")
    reply, i = None, find(ids, head)
    while i >= 0:  # from reply to reply, so that a head inside a reply is not taken for one
        start = i + len(head)
        end = find(ids, tail, start)
        reply = (start, len(ids) if end < 0 else end)
        i = find(ids, head, reply[1] + len(tail))
    return reply


def voice_prompt_rows(length, ref_codes=None, has_speaker=False):
    """Audio rows (8, length) of the text before a reply: pads, the voice's reference frames
    right-aligned to end at the reply, and the speaker slot just before them. Position 0 stays free
    for the slot when there is a speaker embedding; too long a reference keeps its latest frames.
    ref_codes: (8, R) frames, (1, 8, R), or flattened frame-major codes."""
    rows = torch.full((N_CODEBOOKS, length), AUDIO_PAD)
    ref = frames_of([]) if ref_codes is None else torch.as_tensor(ref_codes, dtype=torch.long)
    ref = ref.reshape(N_CODEBOOKS, -1) if ref.dim() > 1 else frames_of(ref)
    start = max(int(has_speaker), length - ref.shape[1]) if ref.shape[1] > 0 else length
    if start < length:
        rows[:, start:] = ref[:, ref.shape[1] - (length - start):]
    if has_speaker and start > 0:
        rows[:, start - 1] = SPEAKER_SLOT
    return rows


def build_sample(conversations, tok, max_len, answer_codes=None, ref_codes=None, has_spk=False, n_audio_tokens=0,
                 has_image=False, system_prompt=None, keep_empty_think=False, audio_layout="text_blankline_audio",
                 image_layout="text_blankline_image", use_ref=True):
    """One training sample in the release's nine-row format. conversations: [{role, content}]; answer_codes /
    ref_codes: flattened frame-major Mimi codes of the last reply and of the voice prompt; n_audio_tokens:
    speech-encoder frames of the last question. The other arguments are the per-sample variations (drawn by
    `draw_variations` in training). Returns input_ids (9, max_len-1), text_labels (max_len-1,), audio_labels
    (8, max_len-1)."""
    text = render_sample(conversations, n_audio_tokens, has_image, system_prompt, keep_empty_think, audio_layout,
                         image_layout)
    ids = encode(tok, text)[:max_len]
    ids += [TEXT_PAD] * (max_len - len(ids))
    reply = last_reply(ids, tok)
    text_labels = torch.full((max_len,), IGNORE)
    if reply:  # through its <|im_end|>\n
        start, end = reply
        end = min(end + len(encode(tok, "<|im_end|>\n")), max_len)
        text_labels[start:end] = torch.tensor(ids[start:end])
    audio, audio_labels = audio_rows(ids, reply, tok, answer_codes, ref_codes if use_ref else None, has_spk)
    input_ids = torch.cat([audio[:, :-1], torch.tensor(ids[:-1])[None]])  # (9, max_len-1): predict the next column
    return input_ids, text_labels[1:], audio_labels[:, 1:]


def render_sample(conversations, n_audio_tokens, has_image, system_prompt, keep_empty_think, audio_layout,
                  image_layout):
    """The conversation as chat text, with the sample's variations and its placeholders."""
    turns = [dict(t) for t in conversations]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    if n_audio_tokens > 0 and last_user >= 0:
        turns[last_user]["content"] = place_audio(turns[last_user]["content"], n_audio_tokens, audio_layout)
    for t in turns:
        if has_image and IMAGE_MARK in t["content"]:
            t["content"] = place_image(t["content"], image_layout)
    text = render_chat(turns)
    if not keep_empty_think:
        text = text.replace(EMPTY_THINK, "")
    return expand_image_marks(text) if has_image else text


def audio_rows(ids, reply, tok, answer_codes, ref_codes, has_spk):
    """Audio inputs and labels (8, max_len) for text ids: the voice prompt before the last reply's start,
    then its answer codes, layer i delayed i + 1 steps, each layer ending with a stop id."""
    max_len = len(ids)
    audio = torch.full((N_CODEBOOKS, max_len), AUDIO_PAD)
    labels = torch.full((N_CODEBOOKS, max_len), IGNORE)
    answer = frames_of(answer_codes if answer_codes is not None else [])
    if reply is None or answer.shape[1] == 0:
        return audio, labels
    start, end = reply
    think_end = find(ids, encode(tok, THINK_END), start, min(end, start + REPLY_SEARCH))
    s = min(think_end + len(encode(tok, THINK_END)) if think_end >= 0 else start, max_len)  # reply start
    audio[:, :s] = voice_prompt_rows(s, ref_codes, has_spk)
    answer = torch.cat([answer, torch.full((N_CODEBOOKS, 1), AUDIO_STOP)], dim=1)
    for i in range(N_CODEBOOKS):
        first = s + 1 + i
        n = max(0, min(answer.shape[1], max_len - first))
        audio[i, first:first + n] = answer[i, :n]
        labels[i, first:first + n] = answer[i, :n]
    return audio, labels


# -----------------------------------------------------------------------------------------------
# 11. Streaming generation
# -----------------------------------------------------------------------------------------------
# One step = one column. The Thinker samples a text token; the Talker samples one id per codebook layer, layer i
# starting i + 1 steps after the reply starts. So at step n, layer i emits the code of frame n - 1 - i, and frame f
# is complete once layer 7 has emitted it: frame n - 8 completes at step n. Speech therefore starts 8 steps (640 ms
# of tokens, not of wall time) into the reply, long before the text is done. After the text's EOS, the text inputs
# are forced: a newline (what the training data has there), then padding, while the Talker finishes speaking.

AUDIO_TEMPERATURE = 0.2     # audio is sampled sharp: codes must be right, not creative
AUDIO_TOP_K = 50
AUDIO_PENALTY = 1.05        # a mild push away from repeating the last few codes (stuck tones)
AUDIO_PENALTY_WINDOW = 3


@dataclass
class GenStep:
    text: Optional[int]          # the text token of this step, None once the text has ended
    frame: Optional[list]        # a complete frame of 8 Mimi codes, or None


def penalized(logits, penalty):
    """The repetition penalty's rule: positive logits divided by it, negative ones multiplied."""
    return torch.where(logits > 0, logits / penalty, logits * penalty)


def sample_text(logits, seen, temperature, top_p, repetition_penalty, greedy):
    """logits (V,), seen (V,) bool: every token of the prompt and reply so far -> 0-d token tensor."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = torch.where(seen, penalized(logits, repetition_penalty), logits)
    if greedy:
        return logits.argmax()
    logits = logits / (temperature + 1e-9)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(descending=True)
        beyond = sorted_logits.softmax(-1).cumsum(-1) > top_p
        beyond[1:] = beyond[:-1].clone()
        beyond[0] = False
        logits = logits.masked_fill(beyond.scatter(0, order, beyond), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[0]


def sample_audio(logits, recent, greedy):
    """logits (8, V), recent (8, <=3) ids each layer emitted last -> (8,) ids."""
    logits = logits.float() / AUDIO_TEMPERATURE
    for j in range(recent.shape[1]):  # once per recent id, as the release does (a repeat counts twice)
        ids = recent[:, j:j + 1]                                    # (8, 1)
        logits = logits.scatter(-1, ids, penalized(logits.gather(-1, ids), AUDIO_PENALTY))
    if greedy:
        return logits.argmax(-1)
    top, idx = logits.topk(AUDIO_TOP_K, dim=-1)
    return idx.gather(-1, torch.multinomial(top.softmax(-1), 1))[:, 0]


def emit_codes(codes, n, audio_logits, stop_at, greedy):
    """Sample step n's ids into codes[:, n] (8, steps), layer i from step i + 1 on (it pads before); note each
    layer's stop (the step of its first id >= CODEBOOK_SIZE) in stop_at (8,). -> the frame step n may complete
    (layer i emitted it at step n - 7 + i) and whether it is: past the delay, each code before its layer's stop."""
    layer = torch.arange(N_CODEBOOKS, device=codes.device)
    recent = codes[:, max(0, n - AUDIO_PENALTY_WINDOW):n]
    ids = sample_audio(audio_logits, recent, greedy)                                # (8,)
    codes[:, n] = torch.where(layer < n, ids, AUDIO_PAD)
    stop_at.copy_(torch.where((layer < n) & (ids >= CODEBOOK_SIZE), stop_at.clamp(max=n), stop_at))
    emitted_at = n - N_CODEBOOKS + 1 + layer                                        # (8,)
    frame = codes[layer, emitted_at.clamp(min=0)]
    return frame, (emitted_at > 0).all() & (emitted_at < stop_at).all()


def prompt_columns(model, prompt_ids, max_new_tokens, ref_codes, has_speaker):
    """Prompt text ids (P,) -> (1, 9, P) columns: the voice prompt in the audio rows."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).view(-1)
    positions = model.config.max_position_embeddings
    if max_new_tokens < 1 or len(prompt) + max_new_tokens > positions:
        raise ValueError(f"a prompt of {len(prompt)} tokens and max_new_tokens {max_new_tokens}: need at least one "
                         f"new token and at most {positions} positions (the model's max_position_embeddings)")
    return torch.cat([voice_prompt_rows(len(prompt), ref_codes, has_speaker), prompt[None]])[None]


@torch.inference_mode()
def stream_generate(model, prompt_ids, max_new_tokens=1024, temperature=0.75, top_p=0.9, repetition_penalty=1.0,
                    greedy=False, ref_codes=None, spk_emb=None, audio_embeds=None, image_embeds=None,
                    eos_token_id=IM_END):
    """Yield a GenStep per step: the text token as soon as it is sampled, each frame once complete.
    prompt_ids: (P,) text ids ending with the generation prompt; ref_codes (8, R) and spk_emb (192,): the
    voice; audio_embeds / image_embeds: [(L, 512)] / [(64, 768)] encoder outputs for the prompt's placeholders."""
    device = next(model.parameters()).device
    spk = None if spk_emb is None else torch.as_tensor(spk_emb, dtype=torch.float32, device=device).view(1, -1)
    column = prompt_columns(model, prompt_ids, max_new_tokens, ref_codes, spk is not None).to(device)  # (1, 9, P)
    positions = torch.arange(column.shape[-1], column.shape[-1] + max_new_tokens, device=device)
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    seen[column[0, TEXT_ROW]] = True                        # the text penalty counts the prompt too
    codes = torch.full((N_CODEBOOKS, max_new_tokens), AUDIO_PAD, device=device)  # every id emitted, per step
    stop_at = torch.full((N_CODEBOOKS,), max_new_tokens, device=device)            # no layer has stopped yet
    forced = None                                                                  # the text inputs after EOS
    model.setup_caches(column.shape[-1] + max_new_tokens)
    try:
        for n in range(max_new_tokens):
            if n == 0:
                text_logits, audio_logits = model.prefill(column, spk, audio_embeds, image_embeds)
            elif forced is None:
                text_logits, audio_logits = model.step(column, positions[n - 1:n], spk)
            else:  # the text has ended: only the Talker's logits are needed
                audio_logits = model.speech_step(column, positions[n - 1:n], spk)
            frame, complete = emit_codes(codes, n, audio_logits[0], stop_at, greedy)
            text = (sample_text(text_logits[0], seen, temperature, top_p, repetition_penalty, greedy) if forced is None
                    else torch.tensor(next(forced), device=device))
            flags = torch.stack([complete, (stop_at < max_new_tokens).all()])            # (2,) bool
            text_id, complete, all_stopped, *frame = torch.cat([text[None], flags, frame]).tolist()  # the one sync
            if forced is not None and all_stopped:
                return
            yield GenStep(text_id if forced is None else None, frame if complete else None)
            if forced is None and text_id == eos_token_id:
                forced = itertools.chain([NEWLINE], itertools.repeat(TEXT_PAD))
            seen[text] = True
            column = torch.cat([codes[:, n], text[None]]).view(1, N_ROWS, 1)      # the next step's input
    finally:
        model.setup_caches(None)


def generate(model, prompt_ids, max_new_tokens=1024, **kwargs):
    """Run stream_generate to the end -> (text ids through EOS, list of complete 8-code frames)."""
    steps = list(stream_generate(model, prompt_ids, max_new_tokens, **kwargs))
    return [s.text for s in steps if s.text is not None], [s.frame for s in steps if s.frame is not None]


# -----------------------------------------------------------------------------------------------
# 12. Thin adapters to the frozen side modules
# -----------------------------------------------------------------------------------------------
# MiniMind-O never trains these; it only needs their outputs in the exact form the release used:
#   SenseVoice-Small encoder  speech (16 kHz)   -> (L, 512) frames, L = number of LFR frames (funasr)
#   SigLIP2 base-patch32-256  image             -> (64, 768) patch tokens (transformers)
#   Mimi codec                speech (24 kHz)  <-> (8, F) codes, 1920 samples a frame (moshi)
#   CAM++                     speech (16 kHz)   -> (192,) speaker embedding (funasr)
# The adapters take loaded modules and arrays. Loading the modules from their published files, and
# reading the user's audio and image files, is files.py's work (this file never imports it).

SAMPLE_RATE_SPEECH = 16000          # SenseVoice and CAM++ take 16 kHz
SAMPLE_RATE_MIMI = 24000
MIMI_FRAME_SAMPLES = 1920           # 24 kHz / 12.5 Hz
SPEECH_FEAT_DIM = 560               # what the SenseVoice encoder reads: 80 fbank mels x 7 stacked frames
DITHER = 1.0 / 32768                # funasr's fbank dither: noise of 1 int16 step, against log(0) on silence
DITHER_SEED = 0
SPK_MEL = dict(n_fft=512, win=400, hop=160, n_mels=80, fmin=20.0, fmax=7600.0)  # CAM++'s input (spec §1)
SPK_LOG_FLOOR = 1e-6                # keeps log() finite on digital silence


def resample(wav, sr_in, sr_out):
    """(S,) float32 at sr_in -> (S',) float32 at sr_out (soxr's high-quality polyphase filter)."""
    import soxr
    return wav if sr_in == sr_out else soxr.resample(wav, sr_in, sr_out).astype(np.float32)


def speech_features(frontend, wav16k):
    """(S,) 16 kHz waveform -> (L, 560) features the encoder reads (L = its valid length), on the CPU. funasr
    dithers each frame with fresh noise; here the same noise level comes from a fixed seed, so a clip always
    gives the same features (train.py's encoder cache and exact resume rely on that)."""
    wav = torch.as_tensor(wav16k, dtype=torch.float32)
    wav = wav + DITHER * torch.randn(wav.shape, generator=torch.Generator().manual_seed(DITHER_SEED))
    feats, _ = frontend(wav[None], torch.tensor([wav.numel()]))               # (1, L, 560)
    return feats[0]


@torch.no_grad()
def encode_speech(encoder, wavs):
    """List of (S_i,) 16 kHz waveforms -> list of (L_i, 512) encoder outputs, in one padded batch."""
    if not wavs:
        return []
    feats = [speech_features(encoder.frontend, w) for w in wavs]              # each (L_i, 560)
    lengths = torch.tensor([f.size(0) for f in feats])
    device = next(encoder.parameters()).device
    batch = nn.utils.rnn.pad_sequence(feats, batch_first=True).to(device)     # (B, L_max, 560), zeros
    out, _ = encoder.encoder(batch, lengths.to(device))                      # (B, L_max, 512); padding masked
    return [o[:n] for o, n in zip(out, lengths.tolist())]


def image_pixels(processor, images):
    """List of 8-bit RGB PIL images (files.open_image) -> (N, 3, 256, 256) SigLIP2 input. channels_last
    is said outright: an image 1 or 3 pixels tall would otherwise be taken for channels-first."""
    return processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]


@torch.no_grad()
def encode_images(encoder, processor, images):
    """List of 8-bit RGB PIL images -> (N, 64, 768) patch tokens (SigLIP's last hidden state)."""
    pixels = image_pixels(processor, images).to(encoder.device, encoder.dtype)
    return encoder(pixel_values=pixels).last_hidden_state


@torch.no_grad()
def encode_audio_codes(mimi, wav24k):
    """(S,) 24 kHz waveform -> (8, ceil(S / 1920)) int64 codes (the last frame zero-padded)."""
    wav = torch.as_tensor(wav24k, dtype=torch.float32, device=next(mimi.parameters()).device)
    return mimi.encode(wav[None, None])[0].long()


@torch.no_grad()
def decode_audio_codes(mimi, codes):
    """(8, F) codes -> (F * 1920,) float32 numpy 24 kHz waveform, the whole sequence at once."""
    codes = torch.as_tensor(codes, device=next(mimi.parameters()).device)
    return mimi.decode(codes[None])[0, 0].float().cpu().numpy()


def speaker_features(wav16k):
    """(S,) 16 kHz waveform -> (T, 80) log mel spectrogram (slaney), minus its mean over time."""
    import librosa
    m = SPK_MEL
    banks = librosa.filters.mel(sr=SAMPLE_RATE_SPEECH, n_fft=m["n_fft"], n_mels=m["n_mels"], fmin=m["fmin"],
                                fmax=m["fmax"], htk=False, norm="slaney")                   # (80, 257)
    spec = torch.stft(torch.as_tensor(wav16k, dtype=torch.float32), n_fft=m["n_fft"], hop_length=m["hop"],
                      win_length=m["win"], window=torch.hann_window(m["win"]), return_complex=True).abs().pow(2)
    logmel = (torch.from_numpy(banks) @ spec).clamp(min=SPK_LOG_FLOOR).log().T             # (T, 80)
    return logmel - logmel.mean(dim=0, keepdim=True)    # removes the channel (microphone) colouring


@torch.no_grad()
def speaker_embedding(model, wav16k):
    """(S,) 16 kHz waveform -> (192,) float32 CAM++ embedding (not length-normalised, as in voices.pt)."""
    feats = speaker_features(wav16k)[None].to(next(model.parameters()).device)              # (1, T, 80)
    return model(feats)[0].float().cpu()
