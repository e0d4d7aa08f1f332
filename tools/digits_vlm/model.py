"""digits-vlm: a small MoE vision-language model in the style of Qwen3-VL-MoE / Kimi-VL.

- Vision encoder (ViT): 8×8 patch embedding (Conv, stride 8) + learned positions + pre-norm
  transformer blocks (LayerNorm, MHA, GELU MLP), then a 2-layer projector into the decoder
  width.
- Decoder: the projected patch embeddings replace the ``<image>`` placeholder tokens; then
  ``num_layers`` blocks of RMSNorm → causal self-attention (written out: QKᵀ, mask, an explicit
  Softmax over keys, ·V) → RMSNorm → MoE FFN: a softmax router over ``num_experts`` SwiGLU
  experts, top-k with renormalised weights (Qwen3-MoE / Mixtral), optional shared expert.
- Experts are stored stacked as in transformers 5.x: ``gate_up_proj [E, 2I, H]`` (gate rows
  first, then up) and ``down_proj [E, H, I]``.

The MoE forward has three interchangeable forms with the same weights, for export:
``stacked`` (gather the chosen experts' weights and run batched matmuls: what transformers'
``experts_implementation="batched_mm"`` exports), ``dispatch`` (a loop over experts with
Equal/NonZero index selection and a scatter-add) and ``dense`` (every expert on every token,
weighted by the scattered gate). Training uses a sort-free per-expert loop (``train``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MoEForm = Literal["train", "stacked", "dispatch", "dense"]
#: One attention layer's cached keys and values, each [B, heads, positions, head dim].
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DigitsVLMConfig:
    vocab_size: int = 58
    image_token_id: int = 2
    image_size: int = 64
    patch: int = 8
    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 16
    top_k: int = 2
    intermediate: int = 128
    shared_expert: bool = False
    max_positions: int = 96
    rms_eps: float = 1e-6

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: DigitsVLMConfig) -> None:
        super().__init__()
        n = (cfg.image_size // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(1, cfg.vision_dim, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.vision_dim) * 0.02)
        self.blocks = nn.ModuleList(
            VisionBlock(cfg.vision_dim, cfg.vision_heads) for _ in range(cfg.vision_layers)
        )
        self.norm = nn.LayerNorm(cfg.vision_dim)
        self.proj1 = nn.Linear(cfg.vision_dim, cfg.hidden)
        self.proj2 = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.proj2(F.gelu(self.proj1(self.norm(x))))


class Attention(nn.Module):
    def __init__(self, cfg: DigitsVLMConfig) -> None:
        super().__init__()
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.o_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.heads = cfg.num_heads

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        """Attention of ``x`` [B, T, H] over the cached keys/values ``past`` ([B, h, P, hd]
        each; none: P = 0) and its own; ``bias`` is [B, 1, T, P + T]. Returns the output
        and the keys/values of all P + T positions (the cache after this step)."""
        b, t, d = x.shape
        h, hd = self.heads, d // self.heads
        q = self.q_proj(x).reshape(b, t, h, hd).transpose(1, 2)
        k = self.k_proj(x).reshape(b, t, h, hd).transpose(1, 2)
        v = self.v_proj(x).reshape(b, t, h, hd).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(hd)) + bias
        probs = torch.softmax(scores, dim=-1)  # the attention probabilities MODE reads
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, t, d)), (k, v)


class SparseMoe(nn.Module):
    """Softmax router, top-k with renormalised weights, stacked SwiGLU experts."""

    def __init__(self, cfg: DigitsVLMConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden, cfg.intermediate
        self.gate = nn.Linear(h, e, bias=False)  # the router
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) / math.sqrt(h))
        self.down_proj = nn.Parameter(torch.randn(e, h, i) / math.sqrt(i))
        self.num_experts, self.top_k, self.inter = e, cfg.top_k, i
        self.shared: nn.ModuleDict | None = None
        if cfg.shared_expert:
            self.shared = nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(h, i, bias=False),
                    "up_proj": nn.Linear(h, i, bias=False),
                    "down_proj": nn.Linear(i, h, bias=False),
                }
            )
        self.form: MoEForm = "train"
        self.last_router_probs: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(x), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return probs, top_w, top_i

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gu = x @ self.gate_up_proj[e].t()
        g, u = gu[..., : self.inter], gu[..., self.inter :]
        return (F.silu(g) * u) @ self.down_proj[e].t()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs, top_w, top_i = self.route(x)
        self.last_router_probs = probs
        if self.form == "train":
            out = self._train(x, top_w, top_i)
        elif self.form == "stacked":
            out = self._stacked(x, top_w, top_i)
        elif self.form == "dispatch":
            out = self._dispatch(x, top_w, top_i)
        else:
            out = self._dense(x, top_w, top_i)
        if self.shared is not None:
            s = self.shared
            out = out + s["down_proj"](F.silu(s["gate_proj"](x)) * s["up_proj"](x))
        return out.reshape(shape)

    def _train(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(top_i == e)
            if tok.numel() == 0:
                continue
            y = self.expert(x[tok], e) * top_w[tok, slot, None]
            out.index_add_(0, tok, y)
        return out

    def _stacked(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        # transformers `batched_mm`: one row per (token, slot), gathered expert weights.
        t, h = x.shape
        k = self.top_k
        xs = x.unsqueeze(1).expand(t, k, h).reshape(t * k, 1, h)
        ids = top_i.reshape(-1)
        gu = torch.bmm(xs, self.gate_up_proj[ids].transpose(1, 2)).squeeze(1)
        g, u = gu[:, : self.inter], gu[:, self.inter :]
        act = (F.silu(g) * u).unsqueeze(1)
        y = torch.bmm(act, self.down_proj[ids].transpose(1, 2)).squeeze(1)
        y = y * top_w.reshape(-1, 1)
        return y.reshape(t, k, h).sum(dim=1)

    def _dispatch(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            hit = top_i == e
            idx = torch.nonzero(hit)
            tok = idx[:, 0]
            w = top_w[hit].unsqueeze(-1)
            out = out.index_add(0, tok, self.expert(x[tok], e) * w)
        return out

    def _dense(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        gates = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype).scatter(1, top_i, top_w)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            out = out + gates[:, e : e + 1] * self.expert(x, e)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DigitsVLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = SparseMoe(cfg)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, cache = self.self_attn(self.input_layernorm(x), bias, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class DigitsVLM(nn.Module):
    """Inputs: input_ids [B,T] int64, attention_mask [B,T] int64 (left padding),
    pixel_values [B,1,64,64] float32. Output: logits [B,T,V]."""

    def __init__(self, cfg: DigitsVLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        # Small position embeddings (std 0.02, GPT-2 init): with nn.Embedding's N(0, 1) the
        # position embedding (norm ~11) drowns the projected patch features at image positions.
        nn.init.normal_(self.embed_positions.weight, std=0.02)

    def set_moe_form(self, form: MoEForm) -> None:
        for moe in self.moe_layers():
            moe.form = form

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self._embed(input_ids, pixel_values)
        pos = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        x = x + self.embed_positions(pos)
        # Additive attention bias: causal and key padding, [B, 1, T, T].
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        bias = torch.where(allowed, 0.0, -1e9).to(x.dtype).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, bias)[0]
        return self.lm_head(self.norm(x))

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the ``<image>`` tokens replaced by the patch features."""
        text = self.embed_tokens(input_ids)
        vis = self.visual(pixel_values)  # [B, P, H]
        is_image = input_ids == self.cfg.image_token_id
        # The j-th <image> token of a row takes the j-th patch embedding.
        slot = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1).clamp(min=0)
        slot = slot.clamp(max=vis.shape[1] - 1)
        gathered = torch.gather(vis, 1, slot.unsqueeze(-1).expand(-1, -1, vis.shape[-1]))
        return torch.where(is_image.unsqueeze(-1), gathered, text)

    def forward_cached(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None, past: list[KV] | None,
    ) -> tuple[torch.Tensor, list[KV]]:  # fmt: skip
        """The forward pass over T new tokens after P cached ones.

        ``attention_mask`` covers all P + T positions ([B, P + T], left padding); ``past``
        holds each layer's keys and values of the P cached positions ([B, heads, P, head
        dim]; None: P = 0). Returns the logits [B, T, V] and each layer's keys and values of
        all P + T positions. With P = 0 this is `forward`. Without ``pixel_values`` the
        tokens are text only (a decoder for the steps after the prompt).
        """
        t = input_ids.shape[1]
        x = (
            self.embed_tokens(input_ids)
            if pixel_values is None
            else self._embed(input_ids, pixel_values)
        )
        total = attention_mask.shape[1]  # P + T
        # The positions of the T new tokens: the last T columns of the mask's running count,
        # gathered rather than sliced (a slice from a computed start loses the static length
        # T in the Relax import, which cannot prove total >= T).
        last = (torch.arange(t, device=x.device) + (total - t)).expand(x.shape[0], t)
        pos = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0).gather(1, last)
        x = x + self.embed_positions(pos)
        # Additive attention bias: causal and key padding, [B, 1, T, P + T]; query i sits at
        # position P + i and sees keys 0..P + i.
        causal = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(total - t)
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        bias = torch.where(allowed, 0.0, -1e9).to(x.dtype).unsqueeze(1)
        cache: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, bias, None if past is None else past[i])
            cache.append(kv)
        return self.lm_head(self.norm(x)), cache

    def moe_layers(self) -> list[SparseMoe]:
        return [layer.mlp for layer in self.layers]  # type: ignore[misc]

    def parameter_counts(self) -> dict[str, int]:
        experts = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in self.moe_layers())
        total = sum(p.numel() for p in self.parameters())
        vision = sum(p.numel() for p in self.visual.parameters())
        return {"total": total, "experts": experts, "vision": vision}


def load_balance_loss(probs: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E·Σ_e f_e·P_e, averaged over layers."""
    loss = probs[0].new_zeros(())
    for p in probs:
        e = p.shape[-1]
        top = torch.topk(p, top_k, dim=-1).indices
        f = F.one_hot(top, e).float().sum(1).mean(0) / top_k
        loss = loss + e * (f * p.mean(0)).sum()
    return loss / len(probs)
