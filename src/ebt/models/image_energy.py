"""The bidirectional energy transformer for images (denoising).

A candidate image (B, C, H, W) is cut into patches, every patch attends to every other (DiT
blocks with adaLN-Zero), and a per-patch energy head scores each patch; the image's energy is
the mean over its patches. There is no timestep and no class: one learned condition vector
drives every adaLN modulation. Prediction is gradient descent on the image itself,
x <- x - alpha * dE/dx, starting from the noisy image; the thinking loop that takes those steps
is shared with the other modalities and lives outside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ebt.models import image_gradient
from ebt.models.dit import ImageShape
from ebt.models.energy_plumbing import EnergyPlumbing, autograd_energies_and_gradient
from ebt.nn.dit import AdaLNHead, DiTBlock, PatchEmbedding, init_dit_weights
from ebt.thinking.loop import Trajectory, resolve_step_size, step_options, step_schedule
from ebt.thinking.loop import think as run_thinking


@dataclass
class NoContext:
    """The context 'cache' of a model without a context stream: only the landscape."""

    landscape: int = 0


@dataclass
class ImageEnergyArgs(ImageShape):
    step_size: float = 3000.0
    step_size_learnable: bool = True
    langevin_noise: float = 0.0
    landscapes: int = 1  # repeats of the steps (no landscape conditioning: labels only)
    inference_steps: int = 1  # default steps per landscape for `think`


class ImageEnergyTransformer(EnergyPlumbing, nn.Module):
    """Scores candidate images with one scalar energy each (lower = more plausible).

    It meets the shared thinking loop's EnergyModel protocol (thinking.py) with no context
    stream: `encode_context` returns a NoContext, the state is the image itself.
    """

    context_depends_on_landscape = False

    def __init__(self, args: ImageEnergyArgs) -> None:
        super().__init__()
        self.args = args
        self.init_thinking_parameters(args.step_size, args.step_size_learnable, args.langevin_noise)
        size = args.image_size
        self.patch_embedding = PatchEmbedding(args.channels, args.dim, args.patch_size, size, size)
        ffn_dim = args.ffn_dim or args.dim
        self.blocks = nn.ModuleList(
            DiTBlock(args.dim, args.heads, ffn_dim, double_backward=True)
            for _ in range(args.layers)
        )
        self.energy_head = AdaLNHead(args.dim, 1, bias=False)  # zero-initialised: E constant
        init_dit_weights(self)
        self.condition = nn.Embedding(1, args.dim)  # N(0, 1), as nn.Embedding initialises
        self.hand_written_gradients = True  # see hand_written_path

    @property
    def patch_size(self) -> int:
        return self.args.patch_size

    def patch_energies(self, images: torch.Tensor) -> torch.Tensor:
        """Energy of every patch (B, N) of candidate images (B, C, H, W); H, W multiples of
        the patch size (the position table is computed for sizes other than the built one)."""
        return self.token_energies(self.patch_embedding(images))  # (B, N)

    def token_energies(self, tokens: torch.Tensor) -> torch.Tensor:
        """Energy of every patch (B, N) from its embedding (B, N, D), position included."""
        condition = self.condition.weight  # (1, D): the same for every image, broadcast
        for block in self.blocks:
            tokens = block(tokens, condition)  # (B, N, D)
        return self.energy_head(tokens, condition).squeeze(-1)  # (B, N)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Energy per image (B,) of candidate images (B, C, H, W): the mean of its patches'."""
        return self.patch_energies(images).mean(dim=1)  # (B,)

    def encode_context(self, context: None = None, landscape: int = 0) -> NoContext:
        """Nothing to encode: the model has no context stream."""
        return NoContext(landscape)

    def candidate_input(self, state: torch.Tensor) -> torch.Tensor:
        """The energy reads the candidate image (B, C, H, W) as it is."""
        return state

    def energies(self, cache: NoContext | None, images: torch.Tensor, rows=None, landscape=None):
        """Energy per image (B,) (the thinking protocol's signature; calls the model, so
        module hooks run); cache, rows and landscape are unused."""
        return self(images)  # (B,)

    def head_weight(self) -> torch.Tensor:
        """The energy head's weight (hand_written_path, with image_gradient's written-out
        energy and dE/dx: is it an ordinary parameter?)."""
        return self.energy_head.linear.weight

    def energies_and_gradient(
        self,
        cache: NoContext | None,
        images: torch.Tensor,
        rows=None,
        landscape=None,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energies (B,), dE/dx (B, C, H, W)) of candidate images.

        create_graph=False: first order and detached (inference; the images' own graph, if
        any, is cut). create_graph=True: both keep their graph, so a loss on a step taken with
        dE/dx back-propagates the second-order terms into the parameters (training); images
        that carry a graph (no detach between steps) keep it.

        Written out (image_gradient) where hand_written_path() allows, so that training
        differentiates a first-order graph; otherwise autograd, with create_graph for training.
        """
        if self.hand_written_path(images):
            if create_graph:  # a leaf (a detached step's state) needs no gradient of its own
                images = images if images.grad_fn is not None else images.detach()
                with torch.enable_grad():
                    return image_gradient.energies_and_gradient(self, images)
            with torch.inference_mode():
                energies, gradient = image_gradient.energies_and_gradient(self, images.detach())
            return energies.clone(), gradient.clone()  # normal tensors, for autograd's use
        return autograd_energies_and_gradient(self, images, create_graph)  # (B,), (B, C, H, W)

    def resolve_step_size(self, step_size: float | None) -> torch.Tensor:
        """The inference alpha (the trained one clamped at 1e-4): None the trained alpha;
        0 < a < 1 a times it; a >= 1 a itself."""
        return resolve_step_size(self.step_size.detach().clamp(min=1e-4), step_size)

    def think(
        self,
        noisy: torch.Tensor,
        *,
        steps: int | None = None,
        step_size: float | None = None,
        langevin_noise: float | None = None,
        accept_lower_energies: bool = False,
    ) -> Trajectory:
        """Denoise images (B, C, H, W) by thinking at inference, starting from them.

        steps: steps per landscape (default: the trained recipe's), as the sequence models';
        the image EBT has no landscape conditioning, so its landscapes are repeats. step_size:
        None the trained alpha, 0 < a < 1 that fraction of it, a >= 1 the absolute alpha;
        langevin_noise: default the trained sigma, 0 none. states[k] is the image after step k,
        energies[k] (B,) the energy of the image step k starts from.
        """
        schedule = step_schedule(self.args.landscapes, steps or self.args.inference_steps)
        options = step_options(self, step_size, langevin_noise, accept_lower_energies)
        return run_thinking(self, None, noisy, schedule, options)
