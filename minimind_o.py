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
  1. ids and config                 6. projectors and placeholder injection
  2. RMSNorm, RoPE, KV cache         7. Talker (codec embedding/head, bridge, speaker slot)
  3. attention                       8. MiniMindO forward and the loss
  4. SwiGLU FFN and MoE              9. weights in the published layout
  5. block and Thinker              10. tokenizer, chat text and the nine-row sample
                                    11. streaming generation
                                    12. thin adapters to the frozen side modules

The binding facts (weight layout, token layout, delays, sampling, loss) are written down in
../shared/spec/conformance.md and checked by ../shared/checks/conformance.py against fixtures from the
public reference implementation.
"""
import contextlib
import functools
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
IGNORE = -100           # label value that carries no loss

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

    @classmethod
    def from_dict(cls, d):
        """From a release config.json: keeps our fields, ignores the rest (transformers' extras)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self):
        return asdict(self)


def ffn_width(dim):
    """SwiGLU width used by MiniMind: about pi * dim, rounded up to a multiple of 64."""
    return math.ceil(dim * math.pi / 64) * 64


@dataclass
class BlockShape:
    """What one stack of blocks needs to know (the Thinker and the Talker differ only in this)."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    eps: float
    use_moe: bool
    num_experts: int
    experts_per_tok: int
    norm_topk_prob: bool
    aux_loss_coef: float


def shared_shape(cfg):
    """What the Thinker's and the Talker's blocks have in common: the norm's eps and the FFN kind."""
    return dict(eps=cfg.rms_norm_eps, use_moe=cfg.use_moe, num_experts=cfg.num_experts,
                experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                aux_loss_coef=cfg.router_aux_loss_coef)


def thinker_shape(cfg):
    return BlockShape(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                      n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, ffn_dim=cfg.intermediate_size,
                      **shared_shape(cfg))


TALKER_HEADS, TALKER_KV_HEADS = 8, 4  # the release builds the Talker from a default MiniMind config of width d


def talker_shape(cfg):
    d = cfg.talker_hidden_size
    return BlockShape(dim=d, n_layers=cfg.num_talker_hidden_layers, n_heads=TALKER_HEADS, n_kv_heads=TALKER_KV_HEADS,
                      head_dim=d // TALKER_HEADS, ffn_dim=ffn_width(d), **shared_shape(cfg))


# -----------------------------------------------------------------------------------------------
# 2. RMSNorm, rotary positions, KV cache
# -----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In float32 whatever the model's dtype: x^2 overflows in float16, and bfloat16's 8-bit mantissa
        # makes the mean of squares inaccurate.
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).type_as(x)


def rope_tables(head_dim, max_pos, theta, yarn=False, factor=16, original_max=2048, beta_fast=32, beta_slow=1):
    """cos/sin tables (max_pos, head_dim) for "rotate half" RoPE: the half-table concatenated twice.

    YaRN (optional, for inference beyond the trained length) slows the low-frequency dimensions by
    `factor`, leaves the high-frequency ones alone, and ramps linearly in between."""
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


class KVCache:
    """Keys and values of every attention layer (Thinker and Talker), preallocated to max_len.

    A decoding step writes its new column in place; nothing is concatenated or copied, so a step
    costs the same at position 10 as at position 1000 (apart from attention itself)."""

    def __init__(self, model, batch_size, max_len):
        p = next(model.parameters())
        attns = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda a: a.cache_slot)
        self.keys = [torch.zeros(batch_size, a.n_kv_heads, max_len, a.head_dim, device=p.device, dtype=p.dtype)
                     for a in attns]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.max_len = max_len
        self.length = 0  # positions already stored (advanced by MiniMindO.forward)

    def append(self, slot, k, v):
        """k, v: (B, kv_heads, T, head_dim) for the new positions -> all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.keys[slot][:, :, self.length:end] = k
        self.values[slot][:, :, self.length:end] = v
        return self.keys[slot][:, :, :end], self.values[slot][:, :, :end]


# -----------------------------------------------------------------------------------------------
# 3. Attention: grouped kv heads, q/k RMSNorm, RoPE, causal
# -----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, s: BlockShape, cache_slot):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.cache_slot = cache_slot  # which KVCache entry is ours
        self.q_proj = nn.Linear(s.dim, s.n_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.dim, s.n_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.dim, s.n_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, s.dim, bias=False)
        # Normalising q and k per head keeps attention logits bounded (stable training at small size).
        self.q_norm = RMSNorm(s.head_dim, s.eps)
        self.k_norm = RMSNorm(s.head_dim, s.eps)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.append(self.cache_slot, k, v)  # (B, kvh, start + T, hd)
        if start == 0 or T == 1:  # a whole prompt, or one new position that may see everything
            out = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0 and T > 1, enable_gqa=True)
        else:  # a chunk after cached positions: causal, shifted by `start`
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
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

    def __init__(self, s: BlockShape):
        super().__init__()
        self.top_k, self.norm_topk_prob, self.aux_loss_coef = s.experts_per_tok, s.norm_topk_prob, s.aux_loss_coef
        self.gate = nn.Linear(s.dim, s.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(FeedForward(s.dim, s.ffn_dim) for _ in range(s.num_experts))

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
    def __init__(self, s: BlockShape, cache_slot):
        super().__init__()
        self.input_layernorm = RMSNorm(s.dim, s.eps)
        self.self_attn = Attention(s, cache_slot)
        self.post_attention_layernorm = RMSNorm(s.dim, s.eps)
        self.mlp = MoEFeedForward(s) if s.use_moe else FeedForward(s.dim, s.ffn_dim)

    def forward(self, h, cos, sin, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        if isinstance(self.mlp, MoEFeedForward):
            out, aux = self.mlp(self.post_attention_layernorm(h))
            return h + out, aux
        return h + self.mlp(self.post_attention_layernorm(h)), h.new_zeros(())


class BlockStack(nn.Module):
    """n blocks with their own RoPE table and final norm. The Thinker and the Talker are each one."""

    def __init__(self, s: BlockShape, cfg: OmniConfig, first_cache_slot):
        super().__init__()
        self.layers = nn.ModuleList(Block(s, first_cache_slot + i) for i in range(s.n_layers))
        self.norm = RMSNorm(s.dim, s.eps)
        cos, sin = rope_tables(s.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.inference_rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_pos, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)

    def run(self, h, cache=None, keep_layer=None, stop_at_keep=False):
        """h: (B, T, dim) -> (normed final hidden, hidden after block `keep_layer` (un-normed), aux loss).

        stop_at_keep: return right after block `keep_layer`, with None as the final hidden."""
        start = cache.length if cache is not None else 0
        cos, sin = self.rope_cos[start:start + h.shape[1]], self.rope_sin[start:start + h.shape[1]]
        kept, aux = None, h.new_zeros(())
        for i, layer in enumerate(self.layers):
            h, layer_aux = layer(h, cos, sin, cache)
            aux = aux + layer_aux
            if i == keep_layer:
                kept = h
                if stop_at_keep:
                    return None, kept, aux
        return self.norm(h), kept, aux


class Thinker(BlockStack):
    def __init__(self, cfg: OmniConfig):
        super().__init__(thinker_shape(cfg), cfg, first_cache_slot=0)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


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


def pad_features(feats, dim, device):
    """Per-sample features (list of (L_i, dim) tensors or None) -> (B, L_max, dim) padded, (B,) lengths.

    Batch preparation, not the forward pass: collate functions can hand the padded form directly."""
    lengths = torch.tensor([0 if f is None else f.shape[0] for f in feats], device=device)
    empty = torch.zeros(0, dim, device=device)
    padded = nn.utils.rnn.pad_sequence([empty if f is None else f.to(device) for f in feats], batch_first=True)
    if padded.shape[1] == 0:
        padded = padded.new_zeros(len(feats), 1, dim)
    return padded, lengths


def inject(h, ids, placeholder, feats, lengths):
    """Put feats[b, :n] on the first run of `placeholder` in ids[b], n = min(lengths[b], run length).

    h: (B, T, H) token embeddings; ids: (B, T); feats: (B, L, H); lengths: (B,).
    Batched: every sample's run is found with tensor ops, no Python loop over samples."""
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
    """A frame of 8 codes -> one vector: mean over layers of (shared table + that layer's adapter).

    The shared table lets layers share what a code means; the small adapters (rank 256) let each
    layer's code mean something slightly different."""

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

    def forward(self, h):  # (B, T, d) -> (B, 8, T, vocab)
        shared = self.base(h)
        return torch.stack([shared + adapter(h) for adapter in self.adapters], dim=1)


def mlp_to_norm(in_dim, mid_dim, out_dim, eps):
    """Linear -> GELU -> Linear -> RMSNorm: how both Talker inputs are brought to the same scale."""
    return nn.Sequential(nn.Linear(in_dim, mid_dim), nn.GELU(), nn.Linear(mid_dim, out_dim), RMSNorm(out_dim, eps))


class Talker(BlockStack):
    def __init__(self, cfg: OmniConfig):
        s = talker_shape(cfg)
        super().__init__(s, cfg, first_cache_slot=cfg.num_hidden_layers)
        d, H = s.dim, cfg.hidden_size
        self.embed_tokens = CodecEmbedding(cfg.audio_vocab_size, d)
        self.lm_head = CodecHead(d, cfg.audio_vocab_size)
        self.codec_proj = mlp_to_norm(d, d, d, cfg.rms_norm_eps)
        self.embed_proj = mlp_to_norm(H, H, d, cfg.rms_norm_eps)  # the semantic bridge from the Thinker
        # Learnable mixing scales; the bridge starts 3x louder so early training listens to the text.
        self.text_scale = nn.Parameter(torch.tensor(3.0))
        self.audio_scale = nn.Parameter(torch.tensor(1.0))
        self.spk_proj = nn.Linear(cfg.spk_emb_size, d, bias=False)

    def forward(self, bridge, codes, spk_emb=None, cache=None, last_only=False):
        """bridge: (B, T, H) Thinker middle layer; codes: (B, 8, T) -> audio logits (B, 8, T, vocab), aux.
        last_only: logits of the last position only (B, 8, 1, vocab), what generation samples from."""
        codec = self.embed_tokens(codes)                                       # (B, T, d)
        if spk_emb is not None:  # the speaker slot carries the voice's embedding instead of a code
            slot = (codes[:, 0] == SPEAKER_SLOT)[..., None]
            codec = torch.where(slot, self.spk_proj(spk_emb.to(codec.dtype))[:, None], codec)
        h = self.embed_proj(bridge) * self.text_scale + self.codec_proj(codec) * self.audio_scale
        h, _, aux = self.run(h, cache)
        return self.lm_head(h[:, -1:] if last_only else h), aux


# -----------------------------------------------------------------------------------------------
# 8. The whole model, and the loss
# -----------------------------------------------------------------------------------------------

@dataclass
class OmniOutput:
    text_logits: Optional[torch.Tensor]  # (B, T, vocab); None when run with need_text=False
    audio_logits: torch.Tensor           # (B, 8, T, audio_vocab)
    aux_loss: torch.Tensor               # MoE load-balance loss (0 for the dense model or in eval)


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

    def forward(self, input_ids, audio_embeds=None, image_embeds=None, spk_emb=None, cache=None,
                audio_lengths=None, last_only=False, need_text=True):
        """input_ids: (B, 9, T), rows 0-7 audio layers, row 8 text.

        audio_embeds: speech-encoder output per sample, a list of (L_i, 512) tensors or None, or a
        padded (B, L, 512) tensor with `audio_lengths` (B,). image_embeds: a list of (64, 768) or
        None, or (B, 64, 768). Both are only used at prefill (an empty cache). spk_emb: (B, 192).
        Generation shortcuts: last_only gives logits for the last position only; need_text=False
        (once the reply's text has ended) runs the Thinker only up to the bridge and returns None
        as text_logits: the Talker still needs the bridge, nothing needs the later blocks."""
        codes, text = input_ids[:, :N_CODEBOOKS], input_ids[:, TEXT_ROW]
        h = self.thinker.embed_tokens(text)                                    # (B, T, H)
        if cache is None or cache.length == 0:
            h = self.inject_features(h, text, audio_embeds, image_embeds, audio_lengths)
        hidden, bridge, aux = self.thinker.run(h, cache, keep_layer=self.config.bridge_layer,
                                               stop_at_keep=not need_text)
        audio_logits, talker_aux = self.talker(bridge, codes, spk_emb, cache, last_only)
        if cache is not None:
            cache.length += input_ids.shape[-1]
        text_out = None if hidden is None else self.lm_head(hidden[:, -1:] if last_only else hidden)
        return OmniOutput(text_out, audio_logits, aux + talker_aux)

    def inject_features(self, h, text, audio_embeds, image_embeds, audio_lengths=None):
        cfg = self.config
        if audio_embeds is not None:
            if isinstance(audio_embeds, (list, tuple)):
                audio_embeds, audio_lengths = pad_features(audio_embeds, cfg.audio_hidden_size, h.device)
            feats = self.audio_proj(audio_embeds.to(h.device, next(self.audio_proj.parameters()).dtype))
            h = inject(h, text, AUDIO_PLACEHOLDER, feats, audio_lengths.to(h.device))
        if image_embeds is not None:
            if isinstance(image_embeds, (list, tuple)):
                image_embeds, image_lengths = pad_features(image_embeds, cfg.image_hidden_size, h.device)
            else:
                image_lengths = torch.full((h.shape[0],), image_embeds.shape[1], device=h.device)
            feats = self.vision_proj(image_embeds.to(h.device, next(self.vision_proj.parameters()).dtype))
            h = inject(h, text, IMAGE_PLACEHOLDER, feats, image_lengths)
        return h

    # weight loading/saving in the published layout: see section 9
    def load_official_state_dict(self, state_dict):
        load_official_state_dict(self, state_dict)
        return self


def init_weights(module):
    """The release's initialisation (transformers' default): N(0, 0.02) weights, zero biases. PyTorch's
    N(0, 1) embedding would make the tied output layer start with huge logits (text loss ~50, not ~8.8)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def omni_loss(out, text_labels, audio_labels, stop_weight=10.0):
    """(text loss, audio loss) for labels (B, T) and (B, 8, T), IGNORE where nothing is learned.

    text: mean cross-entropy over labelled positions. audio: per layer, a weighted sum over labelled
    positions (the stop id weighs `stop_weight`, so the model learns to end speech) divided by the
    count, then the mean over the 8 layers (a layer with no labels adds 0)."""
    ce_text = F.cross_entropy(out.text_logits.flatten(0, 1).float(), text_labels.flatten(), ignore_index=IGNORE,
                              reduction="none")
    text_loss = ce_text.sum() / (text_labels != IGNORE).sum().clamp_min(1)  # 0, not NaN, with no labels
    logits = out.audio_logits.float()                                              # (B, 8, T, V)
    ce = F.cross_entropy(logits.permute(0, 3, 1, 2), audio_labels, ignore_index=IGNORE, reduction="none")  # (B, 8, T)
    labelled = audio_labels != IGNORE
    weight = torch.where(audio_labels == AUDIO_STOP, stop_weight, 1.0) * labelled
    per_layer = (ce * weight).sum((0, 2)) / labelled.sum((0, 2)).clamp_min(1)      # (8,)
    return text_loss, per_layer.mean()


# -----------------------------------------------------------------------------------------------
# 9. Weights in the published layout
# -----------------------------------------------------------------------------------------------
# The release names the Thinker `model.`; everything else has the same name here. Checkpoints are
# float16 .pth files (`sft_omni_768.pth`, `sft_omni_768_moe.pth`, the text-only start `llm_768.pth`)
# or Transformers-format folders (config.json + weights, the tied lm_head.weight may be absent).

RELEASE_ACCOUNTS = "`jingyaogong` on Hugging Face and `gongjy` on ModelScope"
PUBLISHED_WEIGHTS = ("the published files are `minimind-3o-pytorch` (sft_omni_768.pth, sft_omni_768_moe.pth, "
                     f"llm_768.pth) and the folders `minimind-3o` / `minimind-3o-moe`, under {RELEASE_ACCOUNTS}")


class WeightLayoutError(ValueError):
    """A state dict that does not fit the model: names the keys and shapes that differ."""


class DamagedFileError(ValueError):
    """A published file is there but cannot be read: a git-lfs pointer (a clone without git-lfs), a
    download cut short, or another file under its name."""


@contextlib.contextmanager
def reading(path, source):
    """Turn whatever a library raises while reading `path` into one message that names the file and
    where a good copy comes from (`source`); a missing file stays a FileNotFoundError."""
    try:
        yield
    except (FileNotFoundError, DamagedFileError):
        raise
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedFileError(f"cannot read {path} ({type(e).__name__}: {detail}). Is it the published file, "
                               "whole? A git-lfs pointer (a clone without git-lfs) or an interrupted download "
                               f"fails like this. Where to get it: {source}") from e


def official_key(our_key):
    return "model." + our_key[len("thinker."):] if our_key.startswith("thinker.") else our_key


def our_key(official):
    return "thinker." + official[len("model."):] if official.startswith("model.") else official


def official_state_dict(model, dtype=torch.float16):
    """Our weights under the release's names, on the CPU, in the release's dtype."""
    return {official_key(k): v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}


def _listing(keys, limit=8):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_official_state_dict(model, state_dict):
    """Load release-named weights strictly: a missing, unexpected or mis-shaped key is an error."""
    ours = model.state_dict()
    theirs = {our_key(k): v for k, v in state_dict.items()}
    if "lm_head.weight" not in theirs and "thinker.embed_tokens.weight" in theirs:
        theirs["lm_head.weight"] = theirs["thinker.embed_tokens.weight"]  # tied; folders may omit it
    missing = [official_key(k) for k in ours if k not in theirs]
    unexpected = [official_key(k) for k in theirs if k not in ours]
    if missing or unexpected:
        raise WeightLayoutError("state dict does not match the model"
                                + (f"; missing keys: {_listing(missing)}" if missing else "")
                                + (f"; unexpected keys: {_listing(unexpected)}" if unexpected else ""))
    for k, p in ours.items():
        if theirs[k].shape != p.shape:
            raise WeightLayoutError(f"shape mismatch for {official_key(k)}: checkpoint {tuple(theirs[k].shape)}, "
                                    f"model {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in ours.items():
            p.copy_(theirs[k])


def start_from_text_model(model, state_dict):
    """Start from the text-only MiniMind (`llm_768.pth`: `model.*` and `lm_head.weight`).

    The Thinker loads strictly. When the widths match, Talker block i starts as a copy of Thinker
    block n_thinker - n_talker + i: the last Thinker blocks already know how to read the text."""
    thinker = {k: v for k, v in state_dict.items() if k.startswith("model.") or k == "lm_head.weight"}
    unexpected = [k for k in state_dict if k not in thinker]
    if unexpected:
        raise WeightLayoutError(f"not a text-only MiniMind checkpoint; unexpected keys: {_listing(unexpected)}")
    full = official_state_dict(model, dtype=torch.float32)
    missing = [k for k in full if k.startswith("model.") and k not in thinker]
    if missing:
        raise WeightLayoutError(f"text-only checkpoint is missing Thinker keys: {_listing(missing)}")
    full.update(thinker)
    if "lm_head.weight" not in thinker:  # tied to the embedding, so a checkpoint may leave it out
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    cfg = model.config
    if cfg.talker_hidden_size == cfg.hidden_size:
        offset = cfg.num_hidden_layers - cfg.num_talker_hidden_layers
        for k in list(full):
            if k.startswith("talker.layers."):
                i, rest = k[len("talker.layers."):].split(".", 1)
                full[k] = full[f"model.layers.{int(i) + offset}.{rest}"]
    load_official_state_dict(model, full)


def weights_file(path):
    """The file holding a checkpoint's weights: `path` itself, or in a release folder the first of
    model.safetensors, pytorch_model.bin, *.pth; None when there is none."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        return None
    candidates = ["model.safetensors", "pytorch_model.bin"] + sorted(f for f in os.listdir(path) if f.endswith(".pth"))
    return next((os.path.join(path, f) for f in candidates if os.path.isfile(os.path.join(path, f))), None)


def read_checkpoint(path):
    """A state dict from a .pth/.bin/.safetensors file, or from a release folder. Clear error if missing."""
    found = weights_file(path)
    if found is None and os.path.isdir(path):
        raise FileNotFoundError(f"no weights in folder {path} (looked for model.safetensors, pytorch_model.bin, "
                                f"*.pth); {PUBLISHED_WEIGHTS}")
    if found is None:
        raise FileNotFoundError(f"checkpoint not found: {path}; {PUBLISHED_WEIGHTS}")
    path = found
    with reading(path, PUBLISHED_WEIGHTS):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state.get("model"), dict) else state  # train.py's resume files nest it


def config_from_state_dict(state_dict):
    """Model shape read off the weights themselves, so any checkpoint file loads without a config."""
    layers = lambda prefix: len({k.split(".")[2] for k in state_dict if k.startswith(prefix)})
    embed = state_dict["model.embed_tokens.weight"]
    talker = "talker.norm.weight" in state_dict
    cfg = dict(vocab_size=embed.shape[0], hidden_size=embed.shape[1], num_hidden_layers=layers("model.layers."),
               use_moe=any(".mlp.experts." in k for k in state_dict))
    if talker:
        cfg.update(talker_hidden_size=state_dict["talker.norm.weight"].shape[0],
                   num_talker_hidden_layers=layers("talker.layers."))
    else:  # a text-only start: a Talker as wide as the Thinker, so it can start from its last blocks
        cfg.update(talker_hidden_size=embed.shape[1])
    return OmniConfig(**cfg)


def load_model(path, device="cpu", dtype=torch.float32, config=None):
    """A ready MiniMindO from a release checkpoint (file or folder), a train.py checkpoint, or
    the text-only MiniMind start. The shape comes from `config`, else the folder's config.json,
    else the weights themselves."""
    state = read_checkpoint(path)
    config_file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if config is not None:
        cfg = config
    elif config_file and os.path.exists(config_file):
        with open(config_file) as f:
            cfg = OmniConfig.from_dict(json.load(f))
    else:
        cfg = config_from_state_dict(state)
    model = MiniMindO(cfg)
    if any(k.startswith("talker.") for k in state):
        load_official_state_dict(model, state)
    else:
        start_from_text_model(model, state)
    return model.to(device, dtype).eval()


@contextlib.contextmanager
def atomic_path(path):
    """Write to the yielded temporary path; it replaces `path` in one rename only when the block succeeds.
    A crash, a kill or a full disk leaves the previous file whole. The temporary name is unique (two
    writers never share it) and keeps the extension, for writers that go by it (soundfile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(model, path):
    """Save in the release's layout (float16 .pth), atomically: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(official_state_dict(model), tmp)


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
SYSTEM_PROMPTS = [  # the release's; see P_SYSTEM_PROMPT
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。", "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。", "你是minimind，请尽力帮助用户解决问题。", "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.", "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model."]
P_SYSTEM_PROMPT = 0.2     # a conversation without a system turn gets one of SYSTEM_PROMPTS
P_KEEP_EMPTY_THINK = 0.2  # the reply keeps its empty think block
P_USE_REF = 0.5           # the voice prompt's reference frames are kept (else only the speaker slot)
AUDIO_LAYOUTS = {"audio_only": 0.4, "text_only": 0.2, "audio_blankline_text": 0.2, "text_blankline_audio": 0.2}
IMAGE_LAYOUTS = {"image_newline_text": 0.2, "image_blankline_text": 0.2, "text_newline_image": 0.2,
                 "text_blankline_image": 0.4}
ROLES = ("system", "user", "assistant")
REPLY_SEARCH = 50  # how far after the reply start to look for "</think>\n\n"


def load_tokenizer(path):
    """The released MiniMind tokenizer (a folder with tokenizer.json, or the file itself)."""
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    source = f"the published model folders (`minimind-3o`, under {RELEASE_ACCOUNTS})"
    if not os.path.exists(file):
        raise FileNotFoundError(f"tokenizer not found: {file}; it ships with {source}")
    with reading(file, source):
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


def find(seq, pattern, start=0, stop=None):
    """Index of the first occurrence of `pattern` in seq[start:stop], or -1."""
    stop = len(seq) if stop is None else stop
    for i in range(start, min(stop, len(seq) - len(pattern) + 1)):
        if seq[i:i + len(pattern)] == pattern:
            return i
    return -1


def reply_spans(ids, tok):
    """(start, end) of every assistant reply: start just after `<|im_start|>assistant\\n`, end at its
    `<|im_end|>\\n` (or the end of the ids when truncated)."""
    head, tail = encode(tok, "<|im_start|>assistant\n"), encode(tok, "<|im_end|>\n")
    spans, i = [], find(ids, head)
    while i >= 0:
        start = i + len(head)
        end = find(ids, tail, start)
        end = len(ids) if end < 0 else end
        spans.append((start, end))
        i = find(ids, head, end + len(tail))
    return spans


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
    """One training sample in the release's nine-row format.

    conversations: [{role, content}]; answer_codes / ref_codes: flattened frame-major Mimi codes of the
    last reply and of the voice prompt; n_audio_tokens: speech-encoder frames of the last question.
    The other arguments are the per-sample variations (drawn by `draw_variations` in training).
    Returns input_ids (9, max_len-1), text_labels (max_len-1,), audio_labels (8, max_len-1)."""
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
    if has_image:
        text = expand_image_marks(text)
    ids = encode(tok, text)[:max_len]
    ids += [TEXT_PAD] * (max_len - len(ids))

    # Text labels: the last reply, through its <|im_end|>\n (earlier replies are context only).
    text_labels = torch.full((max_len,), IGNORE)
    spans = reply_spans(ids, tok)
    if spans:
        start, end = spans[-1]
        end = min(end + len(encode(tok, "<|im_end|>\n")), max_len)
        text_labels[start:end] = torch.tensor(ids[start:end])

    audio = torch.full((N_CODEBOOKS, max_len), AUDIO_PAD)
    audio_labels = torch.full((N_CODEBOOKS, max_len), IGNORE)
    answer = frames_of(answer_codes if answer_codes is not None else [])
    if spans and answer.shape[1] > 0:
        start, end = spans[-1]
        think_end = find(ids, encode(tok, THINK_END), start, min(end, start + REPLY_SEARCH))
        s = min(think_end + len(encode(tok, THINK_END)) if think_end >= 0 else start, max_len)  # reply start
        audio[:, :s] = voice_prompt_rows(s, ref_codes if use_ref else None, has_spk)
        # Answer: layer i is delayed i + 1 steps after the reply start, and ends with a stop id.
        answer = torch.cat([answer, torch.full((N_CODEBOOKS, 1), AUDIO_STOP)], dim=1)
        for i in range(N_CODEBOOKS):
            first = s + 1 + i
            n = max(0, min(answer.shape[1], max_len - first))
            audio[i, first:first + n] = answer[i, :n]
            audio_labels[i, first:first + n] = answer[i, :n]

    input_ids = torch.cat([audio[:, :-1], torch.tensor(ids[:-1])[None]])  # (9, max_len-1): predict the next column
    return input_ids, text_labels[1:], audio_labels[:, 1:]


def draw_variations(rng, has_system_turn=False):
    """The per-sample variations with the release's probabilities; rng is a random.Random."""
    pick = lambda table: rng.choices(list(table), weights=list(table.values()))[0]
    add_system = not has_system_turn and rng.random() < P_SYSTEM_PROMPT
    return dict(system_prompt=rng.choice(SYSTEM_PROMPTS) if add_system else None,
                keep_empty_think=rng.random() < P_KEEP_EMPTY_THINK, audio_layout=pick(AUDIO_LAYOUTS),
                image_layout=pick(IMAGE_LAYOUTS), use_ref=rng.random() < P_USE_REF)


def cut_conversation(conversations, reply_index, tok, max_len, margin=100):
    """Multi-turn rows: keep turns through the reply_index-th assistant turn, backing off to earlier
    replies while the rendered text plus `margin` tokens would not fit in max_len."""
    replies = [i for i, t in enumerate(conversations) if t["role"] == "assistant"]
    for r in range(reply_index, -1, -1):
        kept = conversations[:replies[r] + 1]
        if len(encode(tok, render_chat(kept))) + margin < max_len:
            break
    return kept


def scheduled_sampling(input_ids, text_labels, audio_labels, p=0.05, text_vocab=TEXT_VOCAB, audio_vocab=AUDIO_VOCAB,
                       generator=None):
    """Training only: replace a few ground-truth inputs by random ids, so the model learns to recover
    from its own mistakes at generation time. input_ids (B, 9, T) or (9, T); returns a new tensor."""
    ids = input_ids.clone()
    rand = lambda *shape: torch.rand(shape, generator=generator, device=ids.device)
    audio_pos = (audio_labels != IGNORE).any(-2) & (rand(*ids.shape[:-2], ids.shape[-1]) < p)         # (..., T)
    noise = torch.randint(0, audio_vocab, ids[..., :N_CODEBOOKS, :].shape, generator=generator, device=ids.device)
    ids[..., :N_CODEBOOKS, :] = torch.where(audio_pos[..., None, :], noise, ids[..., :N_CODEBOOKS, :])
    text = ids[..., TEXT_ROW, :]
    text_pos = (text_labels != IGNORE) & (text != IMAGE_PLACEHOLDER) & (rand(*text.shape) < p)
    noise = torch.randint(0, text_vocab, text.shape, generator=generator, device=ids.device)
    ids[..., TEXT_ROW, :] = torch.where(text_pos, noise, text)
    return ids


# -----------------------------------------------------------------------------------------------
# 11. Streaming generation
# -----------------------------------------------------------------------------------------------
# One step = one column. The Thinker samples a text token; the Talker samples one id per codebook
# layer, layer i starting i + 1 steps after the reply starts. So at step n, layer i emits the code
# of frame n - 1 - i, and frame f is complete once layer 7 has emitted it: frame n - 8 completes
# at step n. Speech therefore starts 8 steps (640 ms of tokens, not of wall time) into the reply,
# long before the text is done.

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


def penalize(logits, ids, penalty):
    """The repetition penalty applied at `ids` (last dim)."""
    return logits.scatter(-1, ids, penalized(logits.gather(-1, ids), penalty))


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
        logits = penalize(logits, recent[:, j:j + 1], AUDIO_PENALTY)
    if greedy:
        return logits.argmax(-1)
    top, idx = logits.topk(AUDIO_TOP_K, dim=-1)
    return idx.gather(-1, torch.multinomial(top.softmax(-1), 1))[:, 0]


@torch.inference_mode()
def stream_generate(model, prompt_ids, max_new_tokens=1024, temperature=0.75, top_p=0.9, repetition_penalty=1.0,
                    greedy=False, ref_codes=None, spk_emb=None, audio_embeds=None, image_embeds=None,
                    eos_token_id=IM_END):
    """Yield a GenStep per step: the text token as soon as it is sampled, each frame once complete.

    prompt_ids: (P,) or (1, P) text ids ending with the generation prompt. ref_codes (8, R) and
    spk_emb (192,) give the voice; audio_embeds / image_embeds are encoder outputs for the prompt's
    placeholders (a list with one (L, 512) / (64, 768) tensor). Batch size 1: this is a conversation."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).view(-1)
    positions = model.config.max_position_embeddings
    if max_new_tokens < 1 or len(prompt) + max_new_tokens > positions:
        raise ValueError(f"a prompt of {len(prompt)} tokens and max_new_tokens {max_new_tokens}: need at least one "
                         f"new token and at most {positions} positions (the model's max_position_embeddings)")
    audio_rows = voice_prompt_rows(len(prompt), ref_codes, has_speaker=spk_emb is not None)
    column = torch.cat([audio_rows, prompt[None]]).to(device)[None]                # (1, 9, P)
    spk = None if spk_emb is None else torch.as_tensor(spk_emb, dtype=torch.float32, device=device).view(1, -1)
    cache = KVCache(model, 1, len(prompt) + max_new_tokens)
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    seen[prompt.to(device)] = True
    history = torch.full((N_CODEBOOKS, max_new_tokens), AUDIO_PAD, device=device)  # ids emitted, per step
    first_step = torch.arange(1, N_CODEBOOKS + 1, device=device)                    # layer i starts at step i + 1
    emitted, stop_at = [], [None] * N_CODEBOOKS                                      # host copies
    text_done = newline_fed = False
    for n in range(max_new_tokens):
        # Logits of the last position only; once the text has ended, the Thinker stops at the bridge.
        out = model(column, audio_embeds=audio_embeds if n == 0 else None,
                    image_embeds=image_embeds if n == 0 else None, spk_emb=spk, cache=cache,
                    last_only=True, need_text=not text_done)
        codes = sample_audio(out.audio_logits[0, :, -1], history[:, max(0, n - AUDIO_PENALTY_WINDOW):n], greedy)
        codes = torch.where(first_step <= n, codes, AUDIO_PAD)
        text = None if text_done else sample_text(out.text_logits[0, -1], seen, temperature, top_p,
                                                  repetition_penalty, greedy)
        # The step's device->host sync (a MoE layer adds one of its own, to split tokens among experts).
        ids = (codes if text is None else torch.cat([codes, text[None]])).tolist()
        frame_ids = ids[:N_CODEBOOKS]
        if text_done:  # after EOS the text row reads a newline, then padding
            text_id, newline_fed = (TEXT_PAD if newline_fed else NEWLINE), True
        else:
            text_id = ids[TEXT_ROW]
        for i, c in enumerate(frame_ids):
            if stop_at[i] is None and c >= CODEBOOK_SIZE and i < n:
                stop_at[i] = n
        if text_done and all(s is not None for s in stop_at):
            return
        history[:, n] = codes
        emitted.append(frame_ids)
        frame = None
        if n >= N_CODEBOOKS:  # frame n - 8 just completed: layer i emitted it at step n - 7 + i
            at = [n - N_CODEBOOKS + 1 + i for i in range(N_CODEBOOKS)]
            if all(stop_at[i] is None or at[i] < stop_at[i] for i in range(N_CODEBOOKS)):
                frame = [emitted[at[i]][i] for i in range(N_CODEBOOKS)]
        yield GenStep(None if text_done else text_id, frame)
        text_done = text_done or text_id == eos_token_id
        seen[text_id] = True
        column = torch.tensor(frame_ids + [text_id], device=device).view(1, N_ROWS, 1)


def generate(model, prompt_ids, max_new_tokens=1024, **kwargs):
    """Run stream_generate to the end -> (text ids through EOS, list of complete 8-code frames)."""
    text, frames = [], []
    for step in stream_generate(model, prompt_ids, max_new_tokens, **kwargs):
        if step.text is not None:
            text.append(step.text)
        if step.frame is not None:
            frames.append(step.frame)
    return text, frames


# -----------------------------------------------------------------------------------------------
# 12. Thin adapters to the frozen side modules
# -----------------------------------------------------------------------------------------------
# MiniMind-O never trains these; it only needs their outputs in the exact form the release used:
#   SenseVoice-Small encoder  speech (16 kHz)      -> (L, 512) frames, L = number of LFR frames
#   SigLIP2 base-patch32-256  image                -> (64, 768) patch tokens
#   Mimi codec                speech (24 kHz)     <-> (8, F) codes, 1920 samples a frame
#   CAM++                     speech (16 kHz)      -> (192,) speaker embedding
#   Silero VAD                16 kHz mic chunks    -> speech start / end events (barge-in)
# Heavy libraries (funasr, moshi, transformers, silero_vad, soundfile, soxr, librosa, PIL) are imported
# inside the functions that need them, so importing this file costs only torch and numpy.

SAMPLE_RATE_SPEECH = 16000          # SenseVoice, CAM++ and Silero VAD all take 16 kHz
SAMPLE_RATE_MIMI = 24000
MIMI_FRAME_SAMPLES = 1920           # 24 kHz / 12.5 Hz
MIMI_WEIGHTS = "tokenizer-e351c8d8-checkpoint125.safetensors"   # what moshi.models.loaders fetches
MIMI_HUB_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_SOURCE = (f"{MIMI_WEIGHTS} in `{MIMI_HUB_REPO}` on Hugging Face, or the release's `mimi` folder (account "
               "`gongjy`) on ModelScope")

SILENCE_PEAK = 1e-4                 # a file whose loudest sample is below -80 dBFS holds no speech

# SenseVoice front end (spec: Kaldi fbank 80 mels, 25 ms hamming, 10 ms shift, LFR 7/6, CMVN from am.mvn)
FBANK_MELS = 80
FBANK_WINDOW_MS = 25
FBANK_SHIFT_MS = 10
FBANK_LOW_HZ = 20.0                 # Kaldi's default lower band edge; the upper edge is Nyquist
FBANK_PREEMPHASIS = 0.97            # Kaldi default
FBANK_DITHER = 1.0                  # noise std (int16 scale) on every frame: funasr's default, which the release keeps
DITHER_SEED = 0                     # the noise comes from this seed, so a clip always gives the same features
INT16_SCALE = 32768.0               # funasr feeds Kaldi int16-scaled samples, so CMVN stats are on that scale
LFR_M, LFR_N = 7, 6                 # stack 7 frames, hop 6: 100 Hz -> 16.7 Hz, 80 -> 560 dims
SPEECH_FEAT_DIM = FBANK_MELS * LFR_M
SENSEVOICE_FILES = ("config.yaml", "model.pt", "am.mvn")
SENSEVOICE_SOURCE = ("`FunAudioLLM/SenseVoiceSmall` on Hugging Face, or `iic/SenseVoiceSmall` / the release's "
                     "`SenseVoiceSmall` (account `gongjy`) on ModelScope")

# SigLIP2 vision tower
GREY16_PER_GREY8 = 257              # 65535 / 255: a 16-bit grey level per 8-bit one
SIGLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
SIGLIP_SOURCE = ("`google/siglip2-base-patch32-256` on Hugging Face, or the release's `siglip2-base-p32-256-ve` "
                 "(account `gongjy`) on ModelScope")

# CAM++ speaker encoder (spec: 80-mel log spectrogram, n_fft 512, window 400, hop 160, 20-7600 Hz, slaney,
# mean-normalised over time)
SPK_MELS = 80
SPK_N_FFT = 512
SPK_WINDOW = 400
SPK_HOP = 160
SPK_FMIN, SPK_FMAX = 20.0, 7600.0
SPK_LOG_FLOOR = 1e-6                # keeps log() finite on digital silence
CAMPP_WEIGHTS = "campplus_cn_common.bin"
CAMPP_SOURCE = ("`iic/speech_campplus_sv_zh-cn_16k-common` on ModelScope (the release's copy: `campplus`, "
                "account `gongjy`)")

# voice cloning
VOICES_SOURCE = "the release's model/speaker/voices.pt (GitHub jingyaogong/minimind-o)"
MAX_REF_FRAMES = 300                # 24 s of reference codes at most
MIN_CLONE_SECONDS = 1.0             # shorter clips carry too little of a voice
MIN_CLONE_RMS_DBFS = -45.0          # quieter than this the codec mostly encodes noise floor
CLIP_LEVEL = 0.999                  # a sample at or above this magnitude sits on the rail
MAX_CLIPPED_FRACTION = 1e-3         # more than 0.1% of samples on the rail = audibly clipped

# Silero VAD
VAD_CHUNK = 512                     # samples per call at 16 kHz (32 ms), what Silero was trained on


@contextlib.contextmanager
def _quiet_stdout():
    # funasr prints an ffmpeg notice to stdout when first imported; chat.py's terminal is not its to write on
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _require_files(folder, names, source):
    """Raise FileNotFoundError naming the first missing file and where the published one comes from."""
    folder = Path(folder)
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: expected the published folder from {source}")
    return folder


def _source_name(source):
    return source if isinstance(source, (str, Path)) else f"<{len(source)} bytes of audio>"


# ---- audio I/O

def read_audio(source):
    """Decode an audio file (path or bytes) -> (mono float32 numpy (S,), sample rate), untouched otherwise."""
    import soundfile as sf
    name = _source_name(source)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"audio file {name} not found")
    try:
        data, sr = sf.read(source if isinstance(source, (str, Path)) else io.BytesIO(source),
                           dtype="float32", always_2d=True)                    # (S, channels)
    except Exception as e:      # libsndfile reports undecodable data in several exception types
        raise ValueError(f"cannot decode audio {name}: {e}") from e
    wav = data.mean(axis=1)     # stereo -> mono by averaging, which keeps both speakers of a 2-channel call
    if wav.size == 0:
        raise ValueError(f"audio {name} is empty")
    if np.abs(wav).max() < SILENCE_PEAK:
        raise ValueError(f"audio {name} is silent (peak below {SILENCE_PEAK})")
    if wav.size * 1000 < sr * FBANK_WINDOW_MS:
        raise ValueError(f"audio {name} lasts {wav.size * 1000 / sr:.1f} ms, less than one {FBANK_WINDOW_MS} ms "
                         "analysis window: too short to hear")
    return wav, sr


def resample(wav, sr_in, sr_out):
    """(S,) float32 at sr_in -> (S',) float32 at sr_out (soxr's high-quality polyphase filter)."""
    import soxr
    if sr_in == sr_out:
        return wav
    return soxr.resample(wav, sr_in, sr_out).astype(np.float32)


def load_audio(source, target_sr):
    """Any file soundfile reads (path or bytes) -> mono float32 numpy (S,) at target_sr."""
    wav, sr = read_audio(source)
    return resample(wav, sr, target_sr)


# ---- speech encoder: SenseVoice-Small (funasr)

@functools.lru_cache(maxsize=None)
def _kaldi_mel_banks(n_fft):
    """Kaldi's triangular mel filters (80, n_fft//2 + 1) on its 1127 ln(1 + f/700) scale, Nyquist bin zero."""
    mel = lambda hz: 1127.0 * torch.log1p(hz / 700.0)
    nyquist = SAMPLE_RATE_SPEECH / 2
    lo, hi = mel(torch.tensor(FBANK_LOW_HZ)), mel(torch.tensor(nyquist))
    delta = (hi - lo) / (FBANK_MELS + 1)
    left = lo + delta * torch.arange(FBANK_MELS)[:, None]                      # (80, 1)
    centre, right = left + delta, left + 2 * delta
    bins = mel(torch.arange(n_fft // 2) * (SAMPLE_RATE_SPEECH / n_fft))[None]  # (1, n_fft/2)
    up, down = (bins - left) / (centre - left), (right - bins) / (right - centre)
    return F.pad(torch.minimum(up, down).clamp(min=0), (0, 1))                # (80, n_fft/2 + 1)


def kaldi_fbank(wav16k, dither=FBANK_DITHER):
    """(S,) 16 kHz waveform in [-1, 1] -> (T, 80) Kaldi log mel filterbank, as funasr's WavFrontend computes it.

    Written out here so each step can be read (funasr hands them to torchaudio or kaldi-native-fbank; the
    tests compare the two). Settings: 25 ms hamming window, 10 ms shift, Gaussian dither (the release's 1.0, from
    a fixed seed so the same clip always gives the same features), DC removal, pre-emphasis 0.97, power
    spectrum on a 512-point FFT, 20 Hz..Nyquist, snip_edges."""
    win = SAMPLE_RATE_SPEECH * FBANK_WINDOW_MS // 1000                          # 400 samples
    hop = SAMPLE_RATE_SPEECH * FBANK_SHIFT_MS // 1000                           # 160 samples
    n_fft = 1 << (win - 1).bit_length()                                        # 512
    x = torch.as_tensor(wav16k, dtype=torch.float32) * INT16_SCALE
    if x.numel() < win:
        raise ValueError(f"speech clip of {x.numel()} samples is shorter than one {FBANK_WINDOW_MS} ms frame")
    frames = x.unfold(0, win, hop)                                             # (T, 400)
    if dither:  # without it, exact-zero stretches give log(eps) = -15.9, far below anything SenseVoice saw
        noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(DITHER_SEED))
        frames = frames + dither * noise
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)               # Kaldi repeats the first sample
    frames = (frames - FBANK_PREEMPHASIS * previous) * torch.hamming_window(win, periodic=False)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)                       # (T, 257)
    mel = power @ _kaldi_mel_banks(n_fft).T                                    # (T, 80)
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()


def stack_lfr(feats):
    """Low frame rate: (T, 80) -> (ceil(T/6), 560), frame i = frames 6i-3 .. 6i+3 (edges repeated), as funasr."""
    T = feats.size(0)
    L = math.ceil(T / LFR_N)
    left = (LFR_M - 1) // 2                                                    # 3 copies of the first frame
    padded = torch.cat([feats[:1].expand(left, -1), feats, feats[-1:].expand(LFR_M, -1)])
    idx = torch.arange(L)[:, None] * LFR_N + torch.arange(LFR_M)[None]        # (L, 7)
    return padded[idx].reshape(L, SPEECH_FEAT_DIM)


class SpeechEncoder(torch.nn.Module):
    """SenseVoice-Small's encoder and the CMVN of its front end; see speech_features / encode_speech."""

    def __init__(self, encoder, cmvn):
        super().__init__()
        self.encoder = encoder                   # funasr SenseVoiceEncoderSmall
        self.register_buffer("cmvn", cmvn)       # (2, 560): row 0 is added (minus the mean), row 1 multiplies


def speech_features(cmvn, wav16k):
    """(S,) 16 kHz waveform -> (L, 560) normalised LFR features; L is the encoder's valid length.
    cmvn: (2, 560), the SpeechEncoder's shift and scale. Plain signal processing, run on the CPU
    (train.py runs it in its data workers, apart from the encoder)."""
    lfr = stack_lfr(kaldi_fbank(wav16k))
    return (lfr + cmvn[0].cpu()) * cmvn[1].cpu()


def load_speech_encoder(folder, device="cpu"):
    """Published SenseVoiceSmall folder (config.yaml, model.pt, am.mvn) -> frozen SpeechEncoder."""
    import yaml
    folder = _require_files(folder, SENSEVOICE_FILES, SENSEVOICE_SOURCE)
    with _quiet_stdout():
        from funasr.frontends.wav_frontend import load_cmvn
        from funasr.models.sense_voice.model import SenseVoiceEncoderSmall
    with reading(folder / "config.yaml", SENSEVOICE_SOURCE):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        front, encoder_conf = config.get("frontend_conf", {}), config["encoder_conf"]
    expected = dict(fs=SAMPLE_RATE_SPEECH, window="hamming", n_mels=FBANK_MELS, frame_length=FBANK_WINDOW_MS,
                    frame_shift=FBANK_SHIFT_MS, lfr_m=LFR_M, lfr_n=LFR_N)
    if any(front.get(k, v) != v for k, v in expected.items()):
        raise ValueError(f"{folder / 'config.yaml'}: frontend_conf {front} differs from the SenseVoice front end "
                         f"this adapter implements ({expected})")
    encoder = SenseVoiceEncoderSmall(input_size=SPEECH_FEAT_DIM, **encoder_conf)
    with reading(folder / "model.pt", SENSEVOICE_SOURCE):
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)   # funasr checkpoints may wrap the weights once
        prefix = "encoder."                      # model.pt holds the whole ASR model; we keep its encoder
        encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if encoder.output_size() != SPEECH_EMBED_DIM:
        raise ValueError(f"{folder / 'model.pt'}: encoder width {encoder.output_size()}, expected {SPEECH_EMBED_DIM}")
    with reading(folder / "am.mvn", SENSEVOICE_SOURCE):
        cmvn = load_cmvn(str(folder / "am.mvn"))[:, :SPEECH_FEAT_DIM]
        if cmvn.shape != (2, SPEECH_FEAT_DIM):
            raise ValueError(f"expected a shift and a scale of {SPEECH_FEAT_DIM} values, found {tuple(cmvn.shape)}")
    return SpeechEncoder(encoder, cmvn).eval().requires_grad_(False).to(device)


@torch.no_grad()
def encode_speech(encoder, wavs):
    """List of (S_i,) 16 kHz waveforms -> list of (L_i, 512) encoder outputs, in one padded batch."""
    if not wavs:
        return []
    feats = [speech_features(encoder.cmvn, w) for w in wavs]                   # each (L_i, 560)
    lengths = torch.tensor([f.size(0) for f in feats])
    device = encoder.cmvn.device
    batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(device)  # (B, L_max, 560), zeros
    out, _ = encoder.encoder(batch, lengths.to(device))                       # (B, L_max, 512); padding masked
    return [o[:n] for o, n in zip(out, lengths.tolist())]


# ---- vision encoder: SigLIP2 base-patch32-256 (transformers)

def load_vision_encoder(folder, device="cpu"):
    """Published SigLIP2 folder (full model or vision-only) -> (frozen SiglipVisionModel, SiglipImageProcessor)."""
    from transformers import SiglipImageProcessor, SiglipVisionModel
    folder = _require_files(folder, SIGLIP_FILES, SIGLIP_SOURCE)
    with reading(folder / "config.json", SIGLIP_SOURCE):
        json.loads((folder / "config.json").read_text())  # so a damaged config is not blamed on the weights
    with reading(folder / "model.safetensors", SIGLIP_SOURCE):
        model = SiglipVisionModel.from_pretrained(folder, dtype=torch.float32)  # text tower weights skipped
    with reading(folder / "preprocessor_config.json", SIGLIP_SOURCE):
        processor = SiglipImageProcessor.from_pretrained(folder)
    return model.eval().requires_grad_(False).to(device), processor


def _rgb(im):
    """Any PIL image -> 8-bit RGB. 16-bit grey (PIL modes I;16 and I) is scaled to 8 bits first: convert()
    would clip it, and most of the picture would turn white."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        im = Image.fromarray((np.asarray(im, dtype=np.float32) / GREY16_PER_GREY8).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")    # grayscale, palette, CMYK and RGBA all become 3-channel RGB


def _open_image(image):
    from PIL import Image, UnidentifiedImageError
    if isinstance(image, Image.Image):
        return _rgb(image)
    name = image if isinstance(image, (str, Path)) else f"<{len(image)} bytes of image>"
    try:
        with Image.open(image if isinstance(image, (str, Path)) else io.BytesIO(image)) as im:
            return _rgb(im)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


def image_pixels(processor, images):
    """List of images (paths, bytes or PIL) -> (N, 3, 256, 256) SigLIP2 input (RGB, resized, normalised)."""
    rgb = [_open_image(im) for im in images]
    # Said outright: an image 1 or 3 pixels tall would otherwise be taken for channels-first.
    return processor(images=rgb, return_tensors="pt", input_data_format="channels_last")["pixel_values"]


@torch.no_grad()
def encode_images(encoder, processor, images):
    """List of images (paths, bytes or PIL) -> (N, 64, 768) patch tokens (SigLIP's last hidden state)."""
    pixels = image_pixels(processor, images)                                  # (N, 3, 256, 256)
    out = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype)).last_hidden_state  # (N, 64, 768)
    if out.shape[1:] != (IMAGE_TOKENS, IMAGE_EMBED_DIM):
        raise ValueError(f"vision encoder gave tokens of shape {tuple(out.shape[1:])}, "
                         f"expected ({IMAGE_TOKENS}, {IMAGE_EMBED_DIM})")
    return out


# ---- Mimi codec (moshi)

def load_mimi(path=None, device="cpu"):
    """Mimi from a local safetensors file (or a folder holding it); None downloads it from the hub."""
    from moshi.models import loaders
    if path is None:
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(MIMI_HUB_REPO, MIMI_WEIGHTS)
        except Exception as e:   # offline, gated or missing: all end in the same advice
            raise FileNotFoundError(f"could not download {MIMI_WEIGHTS} ({e}); download {MIMI_SOURCE} "
                                    "and pass its path") from e
    path = Path(path)
    if path.is_dir():
        path = path / MIMI_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {MIMI_SOURCE}")
    with reading(path, MIMI_SOURCE):
        mimi = loaders.get_mimi(str(path), device=device)
    mimi.set_num_codebooks(N_CODEBOOKS)   # the release uses the first 8 of Mimi's 32 codebooks
    return mimi.eval().requires_grad_(False)


@torch.no_grad()
def encode_audio_codes(mimi, wav24k):
    """(S,) 24 kHz waveform -> (8, ceil(S / 1920)) int64 codes (the last frame zero-padded)."""
    device = next(mimi.parameters()).device
    wav = torch.as_tensor(wav24k, dtype=torch.float32, device=device)[None, None]   # (1, 1, S)
    return mimi.encode(wav)[0].long()                                               # (8, F)


@torch.no_grad()
def decode_audio_codes(mimi, codes):
    """(8, F) codes -> (F * 1920,) float32 numpy 24 kHz waveform, whole sequence at once."""
    device = next(mimi.parameters()).device
    return mimi.decode(torch.as_tensor(codes, device=device)[None])[0, 0].float().cpu().numpy()


class MimiStreamDecoder:
    """Frames in, 24 kHz PCM out, as the Talker produces them. Use as a context manager:

        with MimiStreamDecoder(mimi, frames_per_call=2) as dec:
            for frame in frames:            # each (8,) codes
                play(dec.push(frame))       # PCM once 2 frames are buffered, else empty
            play(dec.flush())

    Mimi's decoder is causal, so decoding chunk by chunk under moshi's streaming state gives the same samples
    as decoding the whole sequence. Fewer frames per call = lower latency, more calls = more overhead;
    first_call_frames (default: frames_per_call) lets the first sound out sooner. While the decoder is open
    the whole Mimi model is in streaming mode: do not call encode on it. open()/close() do what the `with`
    block does, for a decoder that lives across calls or threads."""

    def __init__(self, mimi, frames_per_call=1, first_call_frames=None):
        if frames_per_call < 1 or (first_call_frames is not None and first_call_frames < 1):
            raise ValueError(f"frames per decode call must be >= 1, got {frames_per_call} (first {first_call_frames})")
        self.mimi, self.frames_per_call = mimi, frames_per_call
        self.first_call_frames = first_call_frames or frames_per_call
        self._pending, self._stream, self._started = [], None, False

    def open(self):
        self._stream = self.mimi.streaming(batch_size=1)   # an ExitStack that resets the state when closed
        self._pending, self._started = [], False
        return self

    def close(self):
        self._stream.close()
        self._stream = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    @torch.no_grad()
    def _decode(self, frames):
        from moshi.utils.compile import no_cuda_graph  # on a GPU, moshi would capture CUDA graphs, which break
        codes = torch.stack(frames, dim=1)              # with a shorter last chunk or another thread: (8, n)
        with no_cuda_graph():
            pcm = self.mimi.decode(codes[None].to(next(self.mimi.parameters()).device))
        self._started = True
        return pcm[0, 0].float().cpu().numpy()

    def push(self, frame):
        """Add one frame (8,) of codes; returns the PCM of each full chunk (n * 1920,), possibly empty."""
        if self._stream is None:
            raise RuntimeError("MimiStreamDecoder.push outside its `with` block")
        self._pending.append(torch.as_tensor(frame, dtype=torch.long).reshape(N_CODEBOOKS))
        if len(self._pending) < (self.frames_per_call if self._started else self.first_call_frames):
            return np.zeros(0, dtype=np.float32)
        frames, self._pending = self._pending, []
        return self._decode(frames)

    def flush(self):
        """Decode whatever frames are still buffered (end of an utterance)."""
        if not self._pending:
            return np.zeros(0, dtype=np.float32)
        frames, self._pending = self._pending, []
        return self._decode(frames)


# ---- speaker encoder: CAM++ (funasr)

@functools.lru_cache(maxsize=None)
def _slaney_mel_banks():
    import librosa
    banks = librosa.filters.mel(sr=SAMPLE_RATE_SPEECH, n_fft=SPK_N_FFT, n_mels=SPK_MELS, fmin=SPK_FMIN,
                                fmax=SPK_FMAX, htk=False, norm="slaney")     # slaney scale and area norm
    return torch.from_numpy(banks)                                           # (80, 257)


def speaker_features(wav16k):
    """(S,) 16 kHz waveform -> (T, 80) log mel spectrogram, minus its mean over time (per the spec)."""
    wav = torch.as_tensor(wav16k, dtype=torch.float32)
    spec = torch.stft(wav, n_fft=SPK_N_FFT, hop_length=SPK_HOP, win_length=SPK_WINDOW,
                      window=torch.hann_window(SPK_WINDOW), return_complex=True).abs().pow(2)  # (257, T)
    logmel = (_slaney_mel_banks() @ spec).clamp(min=SPK_LOG_FLOOR).log().T   # (T, 80)
    return logmel - logmel.mean(dim=0, keepdim=True)    # removes the channel (microphone) colouring


def load_speaker_encoder(folder, device="cpu"):
    """Published CAM++ folder (campplus_cn_common.bin) -> frozen funasr CAMPPlus (80 mels -> 192)."""
    folder = _require_files(folder, (CAMPP_WEIGHTS,), CAMPP_SOURCE)
    with _quiet_stdout():
        from funasr.models.campplus.model import CAMPPlus
    model = CAMPPlus(feat_dim=SPK_MELS, embedding_size=SPK_EMBED_DIM)
    with reading(folder / CAMPP_WEIGHTS, CAMPP_SOURCE):
        model.load_state_dict(torch.load(folder / CAMPP_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def speaker_embedding(model, wav16k):
    """(S,) 16 kHz waveform -> (192,) float32 CAM++ embedding (not length-normalised, as in voices.pt)."""
    feats = speaker_features(wav16k)[None].to(next(model.parameters()).device)  # (1, T, 80)
    return model(feats)[0].float().cpu()


# ---- voices: name -> {'ref_codes': (8, R) int64, 'spk_emb': (192,) float32}, the release's voices.pt format

def _check_voice(name, voice, where):
    codes, emb = voice.get("ref_codes"), voice.get("spk_emb")
    ok = (isinstance(codes, torch.Tensor) and codes.dtype == torch.long and codes.dim() == 2
          and codes.size(0) == N_CODEBOOKS and isinstance(emb, torch.Tensor)
          and emb.shape == (SPK_EMBED_DIM,))
    if not ok:
        raise ValueError(f"voice {name!r} in {where}: expected ref_codes ({N_CODEBOOKS}, R) int64 and "
                         f"spk_emb ({SPK_EMBED_DIM},)")


def load_voices(path):
    """voices.pt -> dict name -> {'ref_codes': (8, R) int64, 'spk_emb': (192,) float32}."""
    with reading(path, VOICES_SOURCE):
        voices = torch.load(path, map_location="cpu", weights_only=True)
    for name, voice in voices.items():
        _check_voice(name, voice, path)
    return voices


def check_clone_clip(wav, sr, name):
    """Raise ValueError when a reference clip is too short, too quiet or clipped to make a usable voice."""
    seconds = wav.size / sr
    if seconds < MIN_CLONE_SECONDS:
        raise ValueError(f"voice clip {name} is {seconds:.2f} s long; at least {MIN_CLONE_SECONDS} s is needed")
    rms_dbfs = 20 * math.log10(float(np.sqrt(np.mean(wav ** 2))))
    if rms_dbfs < MIN_CLONE_RMS_DBFS:
        raise ValueError(f"voice clip {name} is too quiet ({rms_dbfs:.1f} dBFS RMS, "
                         f"need at least {MIN_CLONE_RMS_DBFS} dBFS)")
    clipped = float(np.mean(np.abs(wav) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_FRACTION:
        raise ValueError(f"voice clip {name} is clipped ({clipped:.2%} of samples at full scale); "
                         "record it again at a lower level")


def clone_voice(wav_path, mimi, campp):
    """A speech clip -> voice dict: its first <= 300 Mimi frames as ref_codes and its CAM++ embedding."""
    wav, sr = read_audio(wav_path)
    check_clone_clip(wav, sr, wav_path)     # judged at the file's own rate, before resampling smooths clipping
    wav24 = resample(wav, sr, SAMPLE_RATE_MIMI)[:MAX_REF_FRAMES * MIMI_FRAME_SAMPLES]
    voice = {"ref_codes": encode_audio_codes(mimi, wav24).cpu(),                            # (8, <= 300)
             "spk_emb": speaker_embedding(campp, resample(wav24, SAMPLE_RATE_MIMI, SAMPLE_RATE_SPEECH))}
    _check_voice(Path(wav_path).stem, voice, wav_path)
    return voice


def save_voice(voices_path, name, voice):
    """Add (or replace) one voice in a voices.pt file, creating the file if needed."""
    _check_voice(name, voice, "save_voice")
    voices_path = Path(voices_path)
    voices = load_voices(voices_path) if voices_path.exists() else {}
    voices[name] = {"ref_codes": voice["ref_codes"].long().cpu(), "spk_emb": voice["spk_emb"].float().cpu()}
    torch.save(voices, voices_path)


# ---- voice activity: Silero VAD (the silero_vad package ships its weights)

class VoiceActivity:
    """Feed 16 kHz mic chunks of 512 samples; returns 'start' when speech begins, 'end' when it stops, else None.

    chat.py uses 'start' to interrupt the model's reply (barge-in)."""

    def __init__(self, threshold=0.5, min_silence_ms=300):
        from silero_vad import VADIterator, load_silero_vad
        self._vad = VADIterator(load_silero_vad(), threshold=threshold, sampling_rate=SAMPLE_RATE_SPEECH,
                                min_silence_duration_ms=min_silence_ms)

    def __call__(self, chunk):
        chunk = torch.as_tensor(chunk, dtype=torch.float32)
        if chunk.shape != (VAD_CHUNK,):
            raise ValueError(f"VoiceActivity takes chunks of {VAD_CHUNK} samples at 16 kHz, got {tuple(chunk.shape)}")
        event = self._vad(chunk)  # None, {"start": sample} or {"end": sample}
        if not event:
            return None
        return "start" if "start" in event else "end"
