"""The one PSNR and SSIM of the project: training validation, evaluation and reports all use these.

PSNR and SSIM on RGB in [0, 1] (torchmetrics, data_range 1), per image; optionally on the BT.601
Y channel (Restormer's rgb2ycbcr). PSNR of a perfect restoration is capped at PSNR_CAP so
averages and JSON stay finite.
"""

from __future__ import annotations

import torch

PSNR_CAP = 100.0           # dB; the PSNR of an exact restoration (MSE 0) would be infinite
# BT.601 luma of RGB in [0, 1], as Restormer's rgb2ycbcr(y_only=True): Y in [16, 235] / 255.
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_Y_OFFSET = 16.0 / 255.0


def to_y(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W RGB in [0, 1] -> B x 1 x H x W BT.601 luma (Restormer's Y channel)."""
    weights = torch.tensor(_Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True) + _Y_OFFSET


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B) in dB for images in [0, 1], capped at PSNR_CAP (float64 throughout)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = peak_signal_noise_ratio(pred.double(), target.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.nan_to_num(values, posinf=PSNR_CAP).clamp(max=PSNR_CAP)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B): Gaussian window 11, sigma 1.5, over all channels. In float32: CPUs
    have no fast float64 depthwise convolution (60x slower). The cost: windowed (co)variances are
    small differences of large means, so flat regions carry an error of a few 1e-4 (textured
    ones about 1e-7); SSIM is reported to 3-4 decimals."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0, reduction="none")


def image_metrics(pred: torch.Tensor, target: torch.Tensor, y_channel: bool = False) -> dict[str, list[float]]:
    """{metric: per-image values} for B x 3 x H x W batches in [0, 1]."""
    out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if y_channel:
        pred_y, target_y = to_y(pred.float()), to_y(target.float())
        out["psnr_y"], out["ssim_y"] = psnr(pred_y, target_y), ssim(pred_y, target_y)
    return {k: [float(v) for v in values.cpu()] for k, values in out.items()}
