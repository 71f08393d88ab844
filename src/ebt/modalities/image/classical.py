"""Classical denoisers as anchors for the learned ones: scikit-image's non-local means, total
variation (Chambolle) and wavelet (BayesShrink) denoisers.

Each sees the same noisy images as the EBT and the DiT, mapped from [-1, 1] to [0, 1], and its
own noise estimate per image (`skimage.restoration.estimate_sigma`, the robust wavelet-based
estimator, averaged over the channels); nothing tells it the true noise level. The paper's noise
also scales the signal by sqrt(alpha_bar_t) (x_t = sqrt(a) x_0 + sqrt(1 - a) eps), which the
learned models undo on their own; the caller passes that factor as `signal_scale` and the
images are divided by it first, so the anchors are not penalised for a known contrast change.
The parameters are scikit-image's documented starting points:

- ``nl_means``: patch 5 x 5, search distance 6, h = 0.8 sigma, fast mode;
- ``tv_chambolle``: weight = sigma (stronger smoothing for noisier images);
- ``wavelet``: BayesShrink soft thresholding in YCbCr, sigma rescaled per sub-band.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ebt.errors import EbtError

Denoise = Callable[[np.ndarray, float], np.ndarray]  # (H, W, 3) in [0, 1], sigma -> same
METHODS = ("nl_means", "tv_chambolle", "wavelet")


def _nl_means(image: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(
        image,
        h=0.8 * sigma,
        sigma=sigma,
        patch_size=5,
        patch_distance=6,
        fast_mode=True,
        channel_axis=-1,
    )


def _tv_chambolle(image: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(image, weight=max(sigma, 1e-6), channel_axis=-1)


def _wavelet(image: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(
        image,
        sigma=sigma,
        method="BayesShrink",
        mode="soft",
        channel_axis=-1,
        convert2ycbcr=True,
        rescale_sigma=True,
    )


DENOISERS: dict[str, Denoise] = {
    "nl_means": _nl_means,
    "tv_chambolle": _tv_chambolle,
    "wavelet": _wavelet,
}


def require_pywavelets() -> None:
    """The noise estimate and the wavelet denoiser need PyWavelets (EbtError, one line)."""
    try:
        import pywt  # noqa: F401
    except ImportError:
        raise EbtError("--classical needs PyWavelets: pip install PyWavelets") from None


def estimate_noise(image: np.ndarray) -> float:
    """The noise standard deviation of an image (H, W, 3) in [0, 1], averaged over channels."""
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(image, channel_axis=-1, average_sigmas=True))


def denoise_image(method: str, noisy: torch.Tensor, signal_scale: float = 1.0) -> torch.Tensor:
    """One image (C, H, W) in [-1, 1] (scaled by `signal_scale`) denoised by `method`;
    returns (C, H, W) in [-1, 1]."""
    array = (noisy.double() / signal_scale).permute(1, 2, 0).numpy()  # (H, W, C)
    unit = (array + 1.0) / 2.0  # (H, W, C) in [0, 1] up to the noise
    clean = DENOISERS[method](unit, estimate_noise(unit))  # (H, W, C)
    restored = torch.from_numpy(np.clip(clean, 0.0, 1.0) * 2.0 - 1.0)  # (H, W, C)
    return restored.permute(2, 0, 1).to(noisy.dtype)  # (C, H, W)


def denoise_batch(method: str, noisy: torch.Tensor, signal_scale: float = 1.0) -> torch.Tensor:
    """Images (B, C, H, W) denoised one by one by `method` (see `denoise_image`)."""
    if method not in DENOISERS:
        raise ValueError(f"unknown classical denoiser {method!r}: use one of {METHODS}")
    require_pywavelets()
    images = [denoise_image(method, image.cpu(), signal_scale) for image in noisy]
    return torch.stack(images).to(noisy.device)  # (B, C, H, W)
