"""What the two energy models share for thinking, mixed into each (EnergyTransformer,
ImageEnergyTransformer): the trained step size and Langevin sigma as parameters, the switch and
test for the written-out gradient path, and the autograd fallback of energies_and_gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class EnergyPlumbing:
    """A mixin for an nn.Module energy model. The model sets `hand_written_gradients` (True:
    the written-out passes where they apply; False forces autograd, for comparison) and names
    its energy head's weight in `head_weight`."""

    hand_written_gradients: bool = True

    def init_thinking_parameters(
        self, step_size: float, learnable: bool, langevin_noise: float
    ) -> None:
        """The step size alpha (learnable if asked) and the Langevin sigma (never learned)."""
        self.step_size = nn.Parameter(torch.tensor(float(step_size)), requires_grad=learnable)
        self.langevin_std = nn.Parameter(torch.tensor(float(langevin_noise)), requires_grad=False)

    def head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def hand_written_path(self, example: torch.Tensor) -> bool:
        """Whether the written-out energy and gradient apply: float32 or float64 candidates
        (also under bf16 autocast, where their products run in bf16 and their softmax, norm
        statistics and energies in float32), ordinary (not FSDP-sharded DTensor) parameters,
        and not turned off."""
        plain = type(self.head_weight()) is nn.Parameter
        floating = example.dtype in (torch.float32, torch.float64)
        return self.hand_written_gradients and plain and floating


def autograd_energies_and_gradient(
    energy: Callable[[torch.Tensor], torch.Tensor],
    candidates: torch.Tensor,
    create_graph: bool,
    detach_leaf: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(energies, dE/dx) of candidates by autograd. create_graph=False: first order, detached
    (the candidates' own graph is cut). create_graph=True: both keep their graph (training);
    a leaf that does not require grad is detached and made one when detach_leaf."""
    with torch.enable_grad():
        if not create_graph or (detach_leaf and not candidates.requires_grad):
            candidates = candidates.detach().requires_grad_()
        energies = energy(candidates)
        (gradient,) = torch.autograd.grad(energies.sum(), candidates, create_graph=create_graph)
    return (energies if create_graph else energies.detach()), gradient
