"""Gaussian diffusion for the DiT baseline: the paper's noise schedule, noising, the
improved-DDPM hybrid loss and deterministic DDIM sampling.

Schedule: linear betas over N = int(diffusion_steps / noise_level) steps, from 1e-4 to 0.02
scaled by 1000 / N, so a noise level is a fraction of a standard 1000-step schedule (level 0.1
with 100 diffusion steps: N = 1000, timestep 99, alpha_bar 0.897).

Everything is written from the equations (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al.
2021) rather than taken from a library. diffusers' schedulers were measured against the paper's
vectors: DDPMScheduler's alpha_bar is within 2.5e-7 and DDIMScheduler's chain within 1.4e-6
(with clip_sample=True, set_timesteps(N) and use_clipped_model_output=True; 8e-3 off without
the last), so they would do. They were not used because (a) the variational-bound loss needs
the posterior q(x_{t-1} | x_t, x_0) and the learned-range variance at a batch of timesteps,
which diffusers does not expose, so a second copy of the schedule would be written here anyway;
(b) their step takes one Python-int timestep and needs the settings above to match the paper;
(c) that step is four lines. One float64 schedule serving noising, loss and sampler is simpler
than wrapping (and importing diffusers takes seconds). tests/models/test_image_models.py checks this
module against diffusers where it is installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> (B, 2C, H, W)


@dataclass
class HybridLoss:
    """Per-image terms (B,) of the improved-DDPM objective: loss = mse + vb."""

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor


def linear_betas(steps: int) -> torch.Tensor:
    """Linear betas (steps,) float64 from 1e-4 to 0.02, both scaled by 1000 / steps."""
    scale = 1000.0 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)  # (B,)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    squared = (mean1 - mean2) ** 2 * (-logvar2).exp()
    return 0.5 * (logvar2 - logvar1 - 1.0 + (logvar1 - logvar2).exp() + squared)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (the one the DDPM decoder uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) elementwise for images x in [-1, 1] quantised to 256 levels (bins of width
    2/255) under N(mean, e^(2 log_scale)); the edge bins extend to -inf / +inf."""
    centred = x - mean
    inverse_std = (-log_scale).exp()
    cdf_plus = _standard_normal_cdf(inverse_std * (centred + 1.0 / 255.0))
    cdf_minus = _standard_normal_cdf(inverse_std * (centred - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1.0 - cdf_minus).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    inner = torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)


class GaussianDiffusion:
    """The schedule's per-timestep tables (float64, cast on use) and what is computed from them.

    Timesteps are 0-based: t = 0 is one noising step. Model outputs follow the DiT with learned
    sigma: channels [0, C) predict the noise, [C, 2C) a value v in [-1, 1] interpolating the log
    variance between the posterior's (v = -1) and beta_t (v = 1).
    """

    def __init__(self, steps: int = 1000) -> None:
        self.steps = steps
        betas = linear_betas(steps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (N,)
        previous = torch.cat((torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]))  # (N,)
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)  # (N,)
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = betas, alphas_cumprod, previous
        # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
        clipped = torch.cat((posterior_variance[1:2], posterior_variance[1:]))  # (N,)
        self.tables = {
            "sqrt_ab": alphas_cumprod.sqrt(),
            "sqrt_one_minus_ab": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_ab": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_ab": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "sqrt_ab_prev": previous.sqrt(),
            "sqrt_one_minus_ab_prev": (1.0 - previous).sqrt(),
            "log_betas": betas.log(),
            "posterior_log_variance": clipped.log(),
            "posterior_coef_x0": betas * previous.sqrt() / (1.0 - alphas_cumprod),
            "posterior_coef_xt": (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }
        self._cast: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def for_noise_level(cls, diffusion_steps: int, noise_level: float) -> GaussianDiffusion:
        """The paper's schedule: N = int(diffusion_steps / noise_level) steps."""
        return cls(int(diffusion_steps / noise_level))

    def timestep_for_level(self, noise_level: float) -> int:
        """The timestep a noise level denotes: int(level * N) - 1 (0.1 of 1000 steps: 99)."""
        return int(noise_level * self.steps) - 1

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t (B,), in like's dtype/device, shaped (B, 1, ..., 1)."""
        key = (name, like.device, like.dtype)
        if key not in self._cast:  # cast first (elementwise), then move: no float64 on device
            self._cast[key] = self.tables[name].to(like.dtype).to(like.device)
        values = self._cast[key][t.to(like.device)]  # (B,)
        return values.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)

    def q_sample(self, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, images (B, C, H, W)."""
        signal = self._at("sqrt_ab", t, clean) * clean  # (B, C, H, W)
        return signal + self._at("sqrt_one_minus_ab", t, clean) * noise  # (B, C, H, W)

    def predict_clean(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by predicted noise eps at x_t (B, C, H, W)."""
        scaled = self._at("sqrt_recip_ab", t, x_t) * x_t  # (B, C, H, W)
        return scaled - self._at("sqrt_recipm1_ab", t, x_t) * eps  # (B, C, H, W)

    def _posterior_mean(self, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean of q(x_{t-1} | x_t, x_0) (B, C, H, W)."""
        from_clean = self._at("posterior_coef_x0", t, x_t) * clean  # (B, C, H, W)
        return from_clean + self._at("posterior_coef_xt", t, x_t) * x_t  # (B, C, H, W)

    def _variational_bound(
        self, output: torch.Tensor, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-image VB term (B,) in bits per dimension, gradients into the variance only."""
        eps, values = output.chunk(2, dim=1)  # (B, C, H, W) each
        true_mean = self._posterior_mean(clean, x_t, t)  # (B, C, H, W)
        true_log_variance = self._at("posterior_log_variance", t, x_t)  # (B, 1, 1, 1)
        model_mean = self._posterior_mean(self.predict_clean(x_t, t, eps.detach()), x_t, t)
        fraction = (values + 1.0) / 2.0  # (B, C, H, W)
        log_beta = self._at("log_betas", t, x_t)  # (B, 1, 1, 1)
        model_log_variance = fraction * log_beta + (1.0 - fraction) * true_log_variance
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
        bits = _mean_over_pixels(kl) / math.log(2.0)  # (B,)
        first = t == 0
        if bool(first.any()):  # at t = 0 the decoder's negative log-likelihood instead
            nll = -discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_variance)
            bits = torch.where(first, _mean_over_pixels(nll) / math.log(2.0), bits)  # (B,)
        return bits

    def hybrid_loss(
        self,
        output: torch.Tensor,
        clean: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> HybridLoss:
        """The improved-DDPM loss of a model output (B, 2C, H, W) at x_t = q_sample(clean, t,
        noise): mean squared error of the predicted noise, plus the variational bound with a
        stop-gradient on the predicted mean (the bound trains the variance only)."""
        eps = output[:, : clean.shape[1]]  # (B, C, H, W)
        mse = _mean_over_pixels((noise - eps) ** 2)  # (B,)
        vb = self._variational_bound(output, clean, x_t, t)  # (B,)
        return HybridLoss(mse + vb, mse, vb)

    def training_losses(
        self, model: Denoiser, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> HybridLoss:
        """hybrid_loss of model(x_t, t) for x_t = q_sample(clean, t, noise)."""
        x_t = self.q_sample(clean, t, noise)  # (B, C, H, W)
        return self.hybrid_loss(model(x_t, t), clean, x_t, t, noise)

    def ddim_step(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from x_t to x_{t-1} (to the x_0 estimate at t = 0).

        The x_0 estimate is clipped to [-1, 1] and the noise re-derived from it.
        """
        eps = output[:, : x_t.shape[1]]  # (B, C, H, W)
        clean = self.predict_clean(x_t, t, eps).clamp(-1.0, 1.0)  # (B, C, H, W)
        scaled = self._at("sqrt_recip_ab", t, x_t) * x_t - clean  # (B, C, H, W)
        eps = scaled / self._at("sqrt_recipm1_ab", t, x_t)  # (B, C, H, W)
        toward = self._at("sqrt_ab_prev", t, x_t) * clean  # (B, C, H, W)
        return toward + self._at("sqrt_one_minus_ab_prev", t, x_t) * eps  # (B, C, H, W)

    @torch.no_grad()
    def ddim(self, model: Denoiser, noisy: torch.Tensor, start: int) -> torch.Tensor:
        """Denoise images (B, C, H, W) noised to timestep `start`: DDIM steps start, ..., 0
        (start + 1 model evaluations). Returns the final x_0 estimate (B, C, H, W)."""
        x = noisy
        for step in range(start, -1, -1):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)  # (B,)
            x = self.ddim_step(model(x, t), x, t)  # (B, C, H, W)
        return x
