"""Restormer-family encoder-decoder: ABAIR's restoration backbone (the architecture only).

Restormer (Zamir et al., CVPR 2022): transformer blocks of multi-Dconv head transposed attention
(MDTA, attention across channels, so its cost is linear in the pixel count) and a gated-Dconv FFN
(GDFN), four levels joined by pixel-unshuffle / pixel-shuffle, skip concatenation, refinement
blocks and a global residual. Optional PromptIR (Potlapalli et al., NeurIPS 2023) prompt blocks
sit at the three decoder levels. ABAIR adds a per-pixel degradation-segmentation head on the last
features for Phase I; it is dropped afterwards and never changes a restored pixel.

Adapters attach by module name (see models/adapters/): every TransformerBlock has `.attn.qkv`,
`.attn.project_out`, `.ffn.project_in`, `.ffn.project_out` (1x1 convolutions) and `.ffn` (the
module AdaptIR runs beside). Tiled inference is models/tiling.py; the fingerprint and the
checkpoint file are models/identity.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.tiling import BlockRunner, block_runner

SIZE_MULTIPLE = 8  # three 2x downsamplings


@dataclass(frozen=True)
class BackboneConfig:
    dim: int = 48
    num_blocks: tuple[int, int, int, int] = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    prompt: bool = False
    seg_classes: int = 0
    prompt_len: int = 5     # learned prompt components per prompt block
    prompt_size: int = 16   # their side at the latent level; doubled at each level up (PromptIR: 16/32/64)

    def __post_init__(self):
        # lists from JSON become tuples so configs compare and hash as values
        object.__setattr__(self, "num_blocks", tuple(int(n) for n in self.num_blocks))
        object.__setattr__(self, "heads", tuple(int(n) for n in self.heads))
        if len(self.num_blocks) != 4 or len(self.heads) != 4:
            raise ValueError("num_blocks and heads need one entry per level (4)")
        for level, heads in enumerate(self.heads):
            channels = self.dim * 2 ** level
            if channels % heads:
                raise ValueError(f"level {level + 1}: {channels} channels do not split into {heads} heads")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BackboneConfig":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown backbone config keys {sorted(unknown)}")
        return cls(**values)


SIZES: dict[str, BackboneConfig] = {
    # Trains for minutes on a 2-core CPU (the default profile): 0.85M parameters. One latent block
    # because the latent level holds most parameters (12*dim^2 per block at 8*dim channels) but
    # few FLOPs; FFN expansion 2 to keep the full-resolution blocks cheap.
    "tiny": BackboneConfig(dim=16, num_blocks=(1, 2, 2, 1), num_refinement_blocks=1, heads=(1, 1, 2, 4),
                           ffn_expansion_factor=2.0, prompt_size=8),
    # Restormer's published configuration: 26.1M parameters.
    "base": BackboneConfig(dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4, heads=(1, 2, 4, 8)),
    # ABAIR's budget (59M): Restormer's depth at 1.5x the width, 58.7M parameters.
    "large": BackboneConfig(dim=72, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4, heads=(1, 2, 4, 8)),
}


# --------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a BxCxHxW tensor, with weight and bias.

    Restormer's WithBias LayerNorm: (x - mean_c) / sqrt(var_c + 1e-5) * weight + bias. Done as one
    fused F.layer_norm on the BxHxWxC view, which is free when x is channels-last.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)                                            # B x H x W x C
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)                                         # B x C x H x W


class MDTA(nn.Module):
    """Multi-Dconv head transposed attention: CxC attention per head, global over the pixels.

    Worked on pixel rows (B x heads x HW x c, a view of the channels-last maps the blocks carry:
    LayerNorm2d leaves them so), and normalised through the sums: Q K^T divided by the norms of Q's
    and K's rows equals F.normalize(Q) F.normalize(K)^T, without writing normalised copies of Q
    and K. On CPU the copies and the normalisations were a third of a block's time."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.pixel_rows(self.qkv_dwconv(self.qkv(x)))             # 3 x B x heads x HW x c
        attn = self.attention_from_sums(*self.sums(q, k))                   # B x heads x c x c
        return self.project_out(self.apply_attention(attn, v, *x.shape[-2:]))

    def pixel_rows(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        """B x 3C x H x W -> q, k, v, each B x heads x HW x C/heads: a view for channels-last
        maps (a copy otherwise)."""
        b, c3, h, w = qkv.shape
        rows = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3, self.heads, c3 // (3 * self.heads))
        return list(rows.permute(2, 0, 3, 1, 4).unbind(0))

    @staticmethod
    def sums(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Over the pixels of q, k (B x heads x HW x c): Q K^T (B x heads x c x c) and the squared
        L2 norms of Q's and K's channel rows (B x heads x c)."""
        return q.transpose(-2, -1) @ k, q.square().sum(-2), k.square().sum(-2)

    def apply_attention(self, attn: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """attn (B x heads x c x c) applied to v's pixel rows (B x heads x HW x c) -> B x C x H x W
        (channels-last)."""
        out = v @ attn.to(v.dtype).transpose(-2, -1)                        # B x heads x HW x c
        b = out.shape[0]
        return out.transpose(1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def attention_from_sums(self, gram: torch.Tensor, q_sq: torch.Tensor, k_sq: torch.Tensor) -> torch.Tensor:
        """The softmax attention from sums over the pixels: gram = Q K^T (B x heads x c x c),
        q_sq / k_sq = squared L2 norms of Q / K rows (B x heads x c)."""
        # F.normalize divides by max(norm, 1e-12)
        q_norm, k_norm = q_sq.sqrt().clamp_min(1e-12), k_sq.sqrt().clamp_min(1e-12)
        attn = gram / (q_norm[..., :, None] * k_norm[..., None, :]) * self.temperature
        return attn.softmax(dim=-1, dtype=torch.float32)


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network: gelu(dw(W1 x)) * dw(W2 x), projected back."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)      # 2 x B x hidden x H x W
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """Pre-norm MDTA then GDFN, each with a residual (models.tiling.forward_tiled: the same in tiles)."""

    def __init__(self, dim: int, heads: int, expansion: float, bias: bool):
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = MDTA(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GDFN(dim, expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(count: int, dim: int, heads: int, expansion: float, bias: bool) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, expansion, bias) for _ in range(count)])


class Downsample(nn.Sequential):
    """C x H x W -> 2C x H/2 x W/2: halve the channels, then pixel-unshuffle."""

    def __init__(self, channels: int):
        super().__init__(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """C x H x W -> C/2 x 2H x 2W: double the channels, then pixel-shuffle."""

    def __init__(self, channels: int):
        super().__init__(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))


class PromptBlock(nn.Module):
    """PromptIR's prompt generation + interaction at one decoder level.

    Generation: softmax(linear(mean over pixels)) weights `prompt_len` learned components, which
    are resized to the feature size and passed through a 3x3 conv. Interaction: concatenate with
    the features, one transformer block, 1x1 back to the feature width.
    """

    def __init__(self, dim: int, heads: int, expansion: float, bias: bool, prompt_len: int, prompt_size: int):
        super().__init__()
        self.components = nn.Parameter(torch.rand(prompt_len, dim, prompt_size, prompt_size))
        self.select = nn.Linear(dim, prompt_len)
        self.prompt_conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.fuse = TransformerBlock(2 * dim, heads, expansion, bias)
        self.reduce = nn.Conv2d(2 * dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor, run_block=None) -> torch.Tensor:
        """run_block(block, x): how to run the fusing transformer block (default: block(x))."""
        weights = self.select(x.mean(dim=(-2, -1))).softmax(dim=-1)                  # B x L
        components = self.components.to(weights.dtype)
        prompt = torch.einsum("bl,lchw->bchw", weights, components)                  # B x C x S x S
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        prompt = self.prompt_conv(prompt.to(x.dtype))                                # B x C x H x W
        fused = torch.cat([x, prompt], dim=1)                                       # B x 2C x H x W
        return self.reduce(self.fuse(fused) if run_block is None else run_block(self.fuse, fused))


class SegmentationHead(nn.Sequential):
    """One logit per degradation class and pixel (multi-label: several may be present at once)."""

    def __init__(self, channels: int, classes: int):
        super().__init__(nn.Conv2d(channels, channels // 2, 3, padding=1), nn.GELU(),
                         nn.Conv2d(channels // 2, classes, 1))


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Pad bottom/right to a multiple of `multiple`: reflect where the image is large enough."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


# --------------------------------------------------------------------------------------------
# The network


class Backbone(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        dim, blocks, heads = config.dim, config.num_blocks, config.heads
        ffn, bias = config.ffn_expansion_factor, config.bias

        self.patch_embed = nn.Conv2d(3, dim, 3, padding=1, bias=False)
        self.encoder_level1 = transformer_stage(blocks[0], dim, heads[0], ffn, bias)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = transformer_stage(blocks[1], dim * 2, heads[1], ffn, bias)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = transformer_stage(blocks[2], dim * 4, heads[2], ffn, bias)
        self.down3_4 = Downsample(dim * 4)
        self.latent = transformer_stage(blocks[3], dim * 8, heads[3], ffn, bias)

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = transformer_stage(blocks[2], dim * 4, heads[2], ffn, bias)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = transformer_stage(blocks[1], dim * 2, heads[1], ffn, bias)
        self.up2_1 = Upsample(dim * 2)
        # level 1 keeps the concatenated 2*dim channels (no reduction), as in Restormer
        self.decoder_level1 = transformer_stage(blocks[0], dim * 2, heads[0], ffn, bias)
        self.refinement = transformer_stage(config.num_refinement_blocks, dim * 2, heads[0], ffn, bias)
        self.output = nn.Conv2d(dim * 2, 3, 3, padding=1, bias=bias)

        if config.prompt:
            size, length = config.prompt_size, config.prompt_len
            self.prompt3 = PromptBlock(dim * 8, heads[3], ffn, bias, length, size)
            self.prompt2 = PromptBlock(dim * 4, heads[2], ffn, bias, length, size * 2)
            self.prompt1 = PromptBlock(dim * 2, heads[1], ffn, bias, length, size * 4)
        else:
            self.prompt3 = self.prompt2 = self.prompt1 = None

        self.seg_head = SegmentationHead(dim * 2, config.seg_classes) if config.seg_classes > 0 else None

    def features(self, x: torch.Tensor, run_block: BlockRunner | None = None) -> torch.Tensor:
        """B x 3 x H x W (H, W multiples of 8) -> B x 2C x H x W, the refinement output.
        run_block(block, x): how to run each transformer block (default: block(x); tiled
        inference passes models.tiling.block_runner)."""
        def stage(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
            for block in blocks:
                x = block(x) if run_block is None else run_block(block, x)
            return x

        enc1 = stage(self.encoder_level1, self.patch_embed(x))           # B x C x H x W
        enc2 = stage(self.encoder_level2, self.down1_2(enc1))            # B x 2C x H/2 x W/2
        enc3 = stage(self.encoder_level3, self.down2_3(enc2))            # B x 4C x H/4 x W/4
        latent = stage(self.latent, self.down3_4(enc3))                  # B x 8C x H/8 x W/8
        if self.prompt3 is not None:
            latent = self.prompt3(latent, run_block)

        dec3 = torch.cat([self.up4_3(latent), enc3], dim=1)             # B x 8C x H/4 x W/4
        dec3 = stage(self.decoder_level3, self.reduce_chan_level3(dec3))  # B x 4C x H/4 x W/4
        if self.prompt2 is not None:
            dec3 = self.prompt2(dec3, run_block)

        dec2 = torch.cat([self.up3_2(dec3), enc2], dim=1)               # B x 4C x H/2 x W/2
        dec2 = stage(self.decoder_level2, self.reduce_chan_level2(dec2))  # B x 2C x H/2 x W/2
        if self.prompt1 is not None:
            dec2 = self.prompt1(dec2, run_block)

        dec1 = torch.cat([self.up2_1(dec2), enc1], dim=1)               # B x 2C x H x W
        return stage(self.refinement, stage(self.decoder_level1, dec1))  # B x 2C x H x W

    def forward(self, x: torch.Tensor, with_seg: bool = False, tile: int | None = None):
        """Restore B x 3 x H x W images (any H, W). Returns restored (not clamped, so L1 training
        sees the raw output), or (restored, seg_logits B x seg_classes x H x W) when with_seg.

        tile: hold the transformer blocks' wide maps for about tile x tile pixels (of the first
        level; deeper levels scale the side so channels x pixels stay the same) at a time. Same
        result as whole-image inference to float rounding; the memory saved is that of the
        blocks' internals (about 5x the block width), not of the skip connections.
        """
        h, w = x.shape[-2:]
        # channels-last throughout: the blocks' LayerNorm2d works on that layout, and a residual
        # add or conv mixing two layouts is several times slower on CPU
        padded = pad_to_multiple(x).contiguous(memory_format=torch.channels_last)
        feats = self.features(padded, None if tile is None else block_runner(tile, self.config.dim))
        restored = (padded + self.output(feats))[..., :h, :w]
        if not with_seg:
            return restored
        if self.seg_head is None:
            raise RuntimeError("this backbone has no segmentation head (seg_classes=0 or dropped)")
        return restored, self.seg_head(feats)[..., :h, :w]

    def drop_seg_head(self) -> None:
        """Remove the Phase I segmentation head; restored pixels do not depend on it."""
        self.seg_head = None
        self.config = dataclasses.replace(self.config, seg_classes=0)


def build_backbone(size_or_config: str | BackboneConfig | Mapping[str, Any] = "tiny", seg_classes: int | None = None,
                   prompt: bool | None = None, **overrides) -> Backbone:
    """A backbone from a named size (SIZES), a BackboneConfig or a dict of its fields.

    seg_classes / prompt / overrides replace the size's or config's values when given.
    """
    if isinstance(size_or_config, str):
        if size_or_config not in SIZES:
            raise ValueError(f"unknown backbone size {size_or_config!r}; known: {sorted(SIZES)}")
        config = SIZES[size_or_config]
    elif isinstance(size_or_config, BackboneConfig):
        config = size_or_config
    else:
        config = BackboneConfig.from_dict(size_or_config)
    if seg_classes is not None:
        overrides["seg_classes"] = seg_classes
    if prompt is not None:
        overrides["prompt"] = prompt
    return Backbone(dataclasses.replace(config, **overrides))
