"""The LoRA adapter kind: on 1x1 convolutions and linear layers, several named adapters per layer
(as PEFT's LoRA layer).

    y = base(x) + sum_k w[b, k] * (alpha_k / r_k) * B_k A_k x

A_k (r_k x in) and B_k (out x r_k) are stored by adapter name next to the base layer. The K
adapters run as one stacked (sum r_k x in) projection, a per-sample scale of each adapter's
channel group, and one (out x sum r_k) projection: two small matmuls whatever K is.

Per-sample weights w (B x K), or per-pixel ones (a B x K x H x W map, models.adapters.base.PixelWeights:
w[b, k] becomes w[b, k, p] at every pixel p, exactly, since the delta is linear in w), are set from outside (models.adapters.bank.AdapterBank does it for
every layer at once); with none set the layer is exactly its base layer.

Merging folds one adapter (or one blend shared by the batch, merge_mix) into the base weight for
zero-overhead inference. While merged the layer IS the merged base layer: per-sample weights are
ignored entirely (for every adapter), so nothing is counted twice. unmerge() puts the original
weight tensor back, bit for bit. Merging is for inference: unmerge before training, moving the
model to another device or dtype, or saving it.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.adapters.base import MergeableLayer, register_kind

DEFAULT_TARGETS = ("attn.qkv", "attn.project_out", "ffn.project_in", "ffn.project_out")


@register_kind("lora", default_targets=DEFAULT_TARGETS, configurable_targets=True, matched_options=("rank", "targets"))
class LoRALayer(MergeableLayer):
    """A 1x1 convolution or linear layer with named LoRA adapters (wraps it in place)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        if isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1) or base.groups != 1 or base.stride != (1, 1) or base.padding not in ((0, 0), "valid"):
                raise TypeError(f"LoRA wraps only plain 1x1 convolutions, got {base}")
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"LoRA wraps nn.Conv2d (1x1) or nn.Linear, got {type(base).__name__}")
        self.is_conv = isinstance(base, nn.Conv2d)
        self.lora_A = nn.ParameterDict()           # name -> rank x in
        self.lora_B = nn.ParameterDict()           # name -> out x rank
        self.scaling: dict[str, float] = {}        # name -> alpha / rank
        self.merged_adapter: str | None = None
        self._original_weight: torch.Tensor | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, *, rank: int = 4, alpha: float = 4.0, hidden: int = 8) -> None:
        """A new adapter: A kaiming-uniform, B zero, so the layer's output does not change."""
        self.check_new(name)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        weight = self.base_layer.weight
        a = torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        self.scaling[name] = alpha / rank

    def remove_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.scaling[name]
        if name in self.active_adapters:
            self.set_weights(None)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """That adapter's tensors under keys relative to this layer."""
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """sum_k w[b, k] * scaling_k * B_k A_k x for the active adapters (None while merged: the
        base weight holds the merged adapter then)."""
        if self.merged_adapter is not None or self.adapter_weights is None or not self.active_adapters:
            return None
        names = self.active_adapters
        ranks = [self.lora_A[n].shape[0] for n in names]
        # fold alpha/rank into B (python floats: no host-device transfer per call)
        if len(names) == 1:
            a = self.lora_A[names[0]]                                                  # r x in
            b = self.lora_B[names[0]] * self.scaling[names[0]]                         # out x r
        else:
            a = torch.cat([self.lora_A[n] for n in names], dim=0)                     # Kr x in
            b = torch.cat([self.lora_B[n] * self.scaling[n] for n in names], dim=1)   # out x Kr
        if self.per_pixel:
            if not self.is_conv:
                raise NotImplementedError("per-pixel LoRA weights need a convolution (B x C x H x W input)")
            # the block's activations are channels-last (LayerNorm2d): work on their pixel rows
            # (B x H x W x C, two matmuls), so the delta shares the base output's layout (a
            # mixed-layout add is several times slower on CPU)
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            weights = self.pixel_weights(x, channels_last).to(x.device, non_blocking=True)  # B x K x h x w
            if len(set(ranks)) == 1 and channels_last:
                b_, _, height, width = x.shape
                rows = F.linear(x.permute(0, 2, 3, 1), a.to(x.dtype))                  # B x h x w x Kr
                rows = rows.view(b_, height, width, len(names), ranks[0]) * weights.permute(0, 2, 3, 1)[..., None].to(rows.dtype)
                rows = F.linear(rows.view(b_, height, width, -1), b.to(rows.dtype))    # B x h x w x out
                return rows.permute(0, 3, 1, 2)                                         # channels-last
            h = F.conv2d(x, a[:, :, None, None].to(x.dtype))                          # B x Kr x h x w
            if len(set(ranks)) == 1:
                b_, _, height, width = h.shape
                h = (h.view(b_, len(names), ranks[0], height, width) * weights[:, :, None].to(h.dtype)).view_as(h)
            else:
                h = h * torch.cat([weights[:, k:k + 1].expand(-1, r, -1, -1) for k, r in enumerate(ranks)], dim=1).to(h.dtype)
            return F.conv2d(h, b[:, :, None, None].to(h.dtype))                       # B x out x h x w
        weights = self.adapter_weights
        if weights.device != x.device:
            weights = weights.to(x.device, non_blocking=True)
        if len(set(ranks)) == 1:
            group_scale = weights.repeat_interleave(ranks[0], dim=1)                  # B x Kr
        else:
            group_scale = torch.cat([weights[:, k:k + 1].expand(-1, r) for k, r in enumerate(ranks)], dim=1)

        if self.is_conv:
            h = F.conv2d(x, a[:, :, None, None].to(x.dtype))                          # B x Kr x H x W
            h = h * group_scale[:, :, None, None].to(h.dtype)
            return F.conv2d(h, b[:, :, None, None].to(h.dtype))                       # B x out x H x W
        h = F.linear(x, a.to(x.dtype))                                                # B x ... x Kr
        h = h * group_scale.view(group_scale.shape[0], *([1] * (x.dim() - 2)), -1).to(h.dtype)
        return F.linear(h, b.to(h.dtype))                                             # B x ... x out

    def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer with W + sum_k w[0, k] * scaling_k * B_k A_k as its weight, computed from
        the weights tensor (merge_mix's maths, traceable: an exported graph takes the blend as an
        input). The batch shares row 0 of the weights."""
        names = self.active_adapters
        weights = self.adapter_weights[0].to(x.device)                                 # K
        ranks = [self.lora_A[n].shape[0] for n in names]
        a = torch.cat([self.lora_A[n] for n in names], dim=0).float()                  # Kr x in
        b = torch.cat([self.lora_B[n] * self.scaling[n] for n in names], dim=1).float()   # out x Kr
        columns = torch.cat([weights[k:k + 1].expand(r) for k, r in enumerate(ranks)]).float()   # Kr
        base = self.base_layer
        weight = (base.weight.float() + ((b * columns) @ a).reshape(base.weight.shape)).to(base.weight.dtype)
        if self.is_conv:
            return F.conv2d(x, weight, base.bias)
        return F.linear(x, weight, base.bias)

    # -- merging ---------------------------------------------------------------------------

    def merge(self, name: str) -> None:
        """W <- W + scaling * B @ A (a merged adapter is switched to another by unmerging first)."""
        self.merge_mix({name: 1.0}, label=name)

    @torch.no_grad()
    def merge_mix(self, mix: Mapping[str, float], label: str | None = None) -> None:
        """W <- W + sum_k mix[k] * scaling_k * B_k @ A_k: a weighted blend shared by the whole
        batch, folded in once (the same maths as per-sample weights with identical rows)."""
        label = label or "mix(" + ",".join(f"{n}={float(w):.6g}" for n, w in mix.items()) + ")"
        if self.merged_adapter == label:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        weight = self.base_layer.weight
        delta = torch.zeros(self.out_features, self.in_features, device=weight.device, dtype=torch.float32)
        for name, w in mix.items():
            if float(w) != 0.0:
                delta += (self.lora_B[name].float() @ self.lora_A[name].float()) * (self.scaling[name] * float(w))
        self._original_weight = weight.data
        weight.data = (weight.data.float() + delta.reshape(weight.shape)).to(weight.dtype)
        self.merged_adapter = label

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the original weight tensor itself (no subtraction, so bit-for-bit exact)."""
        if self.merged_adapter is None:
            return
        self.base_layer.weight.data = self._original_weight
        self._original_weight = None
        self.merged_adapter = None

    def original_base_tensors(self) -> dict[str, torch.Tensor]:
        """The base layer's own tensors that merging changed: {'weight': original} while merged."""
        return {} if self._original_weight is None else {"weight": self._original_weight}

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].shape[0] for n in self.lora_A}
        return f"adapters={ranks}, merged={self.merged_adapter}"
