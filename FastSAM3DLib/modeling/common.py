"""Layers shared by the image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

from typing import Type

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (``lin1 -> act -> lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU, dropout: float = 0.0) -> None:
        """
        Arguments:
          embedding_dim: input and output width.
          mlp_dim: hidden width.
          act: the activation class.
          dropout: dropout on the hidden activations (used for MC-dropout uncertainty).
        """
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """... x embedding_dim -> ... x embedding_dim."""
        return self.lin2(self.dropout(self.act(self.lin1(x))))


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a B x C x D x H x W tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x D x H x W -> same shape."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]
