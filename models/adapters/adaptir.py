"""The AdaptIR adapter kind: the heterogeneous adapter of Guo et al., "Parameter Efficient
Adaptation for Image Restoration with Heterogeneous Mixture-of-Experts" (NeurIPS 2024), run
parallel to each FFN:

    block: x + ffn(n) + sum_k w[b, k] * adapter_k(n),   n = norm2(x)

One adapter, at hidden width h:
    project_in   1x1, C -> h
    local        depthwise 3x3 whose h x 9 kernel is low-rank, A (h x r) @ B (r x 9)
    frequency    rfft2 -> per-channel affine on amplitude and on phase (identity at init) -> irfft2
    channel      attention pooling (softmax-weighted mean over pixels) -> MLP -> channel gates
    ensemble     local * gate(frequency) + frequency * gate(local), times the channel gates
    project_out  1x1, h -> C, zero-initialised: a new adapter changes nothing

Several adapters on one FFN run together (stacked_adapters): their tensors are concatenated
along the channels, so K adapters cost one set of kernels, not K.

Departures from the reference code, and why: no BatchNorm after project_in (batch statistics
would mix the degradations of a mixed batch and differ between training and inference); no abs()
after irfft2 (it would discard the sign, so the identity-initialised branch would not start as
the identity); the channel branch ends in a sigmoid, so it gates rather than rescales freely.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.adapters.base import AdapterLayer, register_kind


def frequency_affine(x: torch.Tensor, amplitude_scale: torch.Tensor, amplitude_shift: torch.Tensor,
                     phase_scale: torch.Tensor, phase_shift: torch.Tensor) -> torch.Tensor:
    """Per-channel affine on the amplitude and the phase of the 2-D spectrum of B x c x H x W;
    the same size comes back, odd sizes included (irfft2 is told the size)."""
    h, w = x.shape[-2:]
    # float32 throughout: cuFFT has no bfloat16, and phases need the precision
    with torch.autocast(device_type=x.device.type, enabled=False):
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")                        # B x c x H x (W//2+1)
        amplitude = spectrum.abs() * amplitude_scale.float()[:, None, None] + amplitude_shift.float()[:, None, None]
        phase = spectrum.angle() * phase_scale.float()[:, None, None] + phase_shift.float()[:, None, None]
        spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        out = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho")                   # B x c x H x W
    return out.to(x.dtype)


class AdaptIRAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int = 8, rank: int = 4, kernel_size: int = 3):
        super().__init__()
        rank = min(rank, hidden)
        self.hidden = hidden
        self.kernel_size = kernel_size
        self.project_in = nn.Conv2d(dim, hidden, 1)

        # local branch: low-rank factorised depthwise kernel
        self.local_A = nn.Parameter(torch.empty(hidden, rank))
        self.local_B = nn.Parameter(torch.empty(rank, kernel_size * kernel_size))
        self.local_bias = nn.Parameter(torch.zeros(hidden))
        nn.init.kaiming_uniform_(self.local_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.local_B, a=math.sqrt(5))

        # frequency branch: per-channel affine on amplitude and phase, starting as the identity
        self.amplitude_scale = nn.Parameter(torch.ones(hidden))
        self.amplitude_shift = nn.Parameter(torch.zeros(hidden))
        self.phase_scale = nn.Parameter(torch.ones(hidden))
        self.phase_shift = nn.Parameter(torch.zeros(hidden))

        # channel branch: attention pooling, then an MLP to per-channel gates
        self.pool_score = nn.Conv2d(hidden, 1, 1)
        squeeze = max(hidden // 2, 1)
        self.channel_mlp = nn.Sequential(nn.Linear(hidden, squeeze), nn.GELU(), nn.Linear(squeeze, hidden))

        # adaptive ensemble: the global (frequency) branch gates the local one per channel, the
        # local branch gates the global one per pixel; both start at 0.5 (zero-initialised logits)
        self.global_gate = nn.Sequential(nn.Linear(hidden, max(hidden // 4, 1)), nn.GELU(),
                                         nn.Linear(max(hidden // 4, 1), hidden))
        self.local_gate = nn.Conv2d(hidden, 1, 1)
        for layer in (self.global_gate[2], self.local_gate):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)
        nn.init.zeros_(self.project_out.weight)

    def frequency(self, x: torch.Tensor) -> torch.Tensor:
        return frequency_affine(x, self.amplitude_scale, self.amplitude_shift, self.phase_scale, self.phase_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)                                                        # B x h x H x W
        hidden = x.shape[1]

        kernel = (self.local_A @ self.local_B).view(hidden, 1, self.kernel_size, self.kernel_size)
        local = F.conv2d(x, kernel.to(x.dtype), self.local_bias.to(x.dtype),
                         padding=self.kernel_size // 2, groups=hidden)                # B x h x H x W
        global_ = self.frequency(x)                                                   # B x h x H x W

        score = self.pool_score(x)                                                    # B x 1 x H x W
        score = score.flatten(1).softmax(dim=-1, dtype=torch.float32).view_as(score).to(x.dtype)
        pooled = (x * score).sum(dim=(2, 3))                                          # B x h
        channel = torch.sigmoid(self.channel_mlp(pooled))[:, :, None, None]           # B x h x 1 x 1

        global_to_local = torch.sigmoid(self.global_gate(global_.mean(dim=(2, 3))))[:, :, None, None]
        local_to_global = torch.sigmoid(self.local_gate(local))                       # B x 1 x H x W
        mixed = global_to_local * local + local_to_global * global_
        return self.project_out(mixed * channel)                                     # B x C x H x W


@register_kind("adaptir", default_targets=("ffn",), matched_options=("rank", "targets", "hidden"))
class AdaptIRLayer(AdapterLayer):
    """A block's FFN (GDFN) with named AdaptIR adapters beside it: ffn(x) + sum_k w[b, k] * adapter_k(x)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.dim = base.project_in.in_channels   # the FFN's input width, which the adapters map back to
        self.adapters = nn.ModuleDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def add_adapter(self, name: str, *, rank: int = 4, alpha: float = 4.0, hidden: int = 8) -> None:
        self.check_new(name)
        reference = next(self.base_layer.parameters())
        self.adapters[name] = AdaptIRAdapter(self.dim, hidden, rank).to(reference.device, reference.dtype)

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        if name in self.active_adapters:
            self.set_weights(None)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.adapters[name].named_parameters())

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """sum_k w[b, k] * adapter_k(x) over the active adapters (None when there are none)."""
        if self.adapter_weights is None or not self.active_adapters:
            return None
        # per-pixel weights (B x K x H x W) scale each adapter's output at every pixel; AdaptIR's
        # delta is computed on the whole level (its FFT is global), so no tiling window applies
        weights = self.pixel_weights(x) if self.per_pixel else self.adapter_weights
        weights = weights.to(x.device, non_blocking=True)
        adapters = [self.adapters[name] for name in self.active_adapters]
        if len({(a.hidden, a.kernel_size) for a in adapters}) == 1:
            return stacked_adapters(x, adapters, weights)
        delta = 0
        for k, adapter in enumerate(adapters):  # mixed widths: one call each
            w = weights[:, k:k + 1] if weights.dim() == 4 else weights[:, k, None, None, None]
            delta = delta + w.to(x.dtype) * adapter(x)
        return delta


def _stacked_mlp(x: torch.Tensor, mlps: list[nn.Sequential]) -> torch.Tensor:
    """K two-layer MLPs (Linear, GELU, Linear) applied to B x K x h, adapter k's MLP to row k."""
    w1 = torch.stack([m[0].weight for m in mlps]).to(x.dtype)                     # K x s x h
    b1 = torch.stack([m[0].bias for m in mlps]).to(x.dtype)                       # K x s
    w2 = torch.stack([m[2].weight for m in mlps]).to(x.dtype)                     # K x h x s
    b2 = torch.stack([m[2].bias for m in mlps]).to(x.dtype)                       # K x h
    hidden = F.gelu(torch.einsum("bkh,ksh->bks", x, w1) + b1)
    return torch.einsum("bks,khs->bkh", hidden, w2) + b2


def stacked_adapters(x: torch.Tensor, adapters: list[AdaptIRAdapter], weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * adapters[k](x), all K adapters at once (weights B x K, or B x K x H x W
    per pixel).

    The same maths as AdaptIRAdapter.forward, with the K adapters' tensors concatenated along
    the channels: one 1x1 conv in, one depthwise conv, one FFT, grouped convs for the per-adapter
    1-channel maps, batched MLPs, and one 1x1 conv out whose input channel groups are scaled by
    the per-sample weights. About 25 kernels per block whatever K is, instead of 25 per adapter.
    """
    k, hid, ks = len(adapters), adapters[0].hidden, adapters[0].kernel_size
    b, _, h, w = x.shape
    dt = x.dtype

    def cat(get):
        return torch.cat([get(a) for a in adapters], dim=0)

    z = F.conv2d(x, cat(lambda a: a.project_in.weight).to(dt), cat(lambda a: a.project_in.bias).to(dt))
    dt = z.dtype                                                                  # B x Kh x H x W
    kernel = cat(lambda a: a.local_A @ a.local_B).view(k * hid, 1, ks, ks)
    local = F.conv2d(z, kernel.to(dt), cat(lambda a: a.local_bias).to(dt), padding=ks // 2, groups=k * hid)
    global_ = frequency_affine(z, cat(lambda a: a.amplitude_scale), cat(lambda a: a.amplitude_shift),
                               cat(lambda a: a.phase_scale), cat(lambda a: a.phase_shift))

    # channel branch: attention pooling per adapter (grouped 1x1 conv: K maps of 1 channel)
    score = F.conv2d(z, cat(lambda a: a.pool_score.weight).to(dt), cat(lambda a: a.pool_score.bias).to(dt),
                     groups=k)                                                    # B x K x H x W
    score = score.flatten(2).softmax(dim=-1, dtype=torch.float32).to(dt).view(b, k, 1, h, w)
    z5 = z.view(b, k, hid, h, w)
    pooled = (z5 * score).sum(dim=(-2, -1))                                       # B x K x h
    channel = torch.sigmoid(_stacked_mlp(pooled, [a.channel_mlp for a in adapters]))

    # adaptive ensemble
    local5, global5 = local.view(b, k, hid, h, w), global_.view(b, k, hid, h, w)
    global_to_local = torch.sigmoid(_stacked_mlp(global5.mean(dim=(-2, -1)), [a.global_gate for a in adapters]))
    local_to_global = torch.sigmoid(F.conv2d(local, cat(lambda a: a.local_gate.weight).to(dt),
                                             cat(lambda a: a.local_gate.bias).to(dt), groups=k))   # B x K x H x W
    mixed = global_to_local[..., None, None] * local5 + local_to_global[:, :, None] * global5    # B x K x h x H x W

    # per-sample adapter weights ride on the channel gates, then one projection sums the adapters;
    # per-pixel weights (B x K x H x W) scale each adapter's maps at every pixel instead
    if weights.dim() == 4:
        mixed = mixed * channel[..., None, None] * weights.to(dt)[:, :, None]
        mixed = mixed.reshape(b, k * hid, h, w)
    else:
        gates = channel * weights.to(channel.dtype)[:, :, None]                   # B x K x h
        mixed = (mixed * gates[..., None, None]).reshape(b, k * hid, h, w)
    return F.conv2d(mixed, torch.cat([a.project_out.weight for a in adapters], dim=1).to(dt))   # B x C x H x W
