"""Encodes click points (and optionally boxes and a mask) for the mask decoder."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of 3D positions: [sin, cos, sin] of a fixed Gaussian projection.

    The third block repeats the sine (it is how the public weights were trained), so a width of
    3 * num_pos_feats comes out.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """... x 3 coordinates in [0, 1] -> ... x (3 * num_pos_feats), float32."""
        matrix = self.positional_encoding_gaussian_matrix.float()
        projected = 2 * math.pi * ((2 * coords.float() - 1) @ matrix)
        return torch.cat([torch.sin(projected), torch.cos(projected), torch.sin(projected)], dim=-1)

    def forward(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """Encoding of every cell centre of a grid: (X, Y, Z) -> C x X x Y x Z.

        The stacked coordinates are (axis1, axis0, axis2) — the first two swapped relative to
        :meth:`forward_with_coords` — exactly as the public weights learned them.
        """
        x, y, z = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((x, y, z), device=device, dtype=torch.float32)
        axis0 = (grid.cumsum(dim=0) - 0.5) / y
        axis1 = (grid.cumsum(dim=1) - 0.5) / x
        axis2 = (grid.cumsum(dim=2) - 0.5) / z
        pe = self._pe_encoding(torch.stack([axis1, axis0, axis2], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int, int]) -> torch.Tensor:
        """B x N x 3 coordinates in voxel units of the input cube -> B x N x C (float32)."""
        scale = torch.tensor(image_size, dtype=torch.float32, device=coords.device)
        return self._pe_encoding(coords.float() / scale)


class PromptEncoder3D(nn.Module):
    """Sparse (points, boxes) and dense (mask) prompt embeddings for the mask decoder."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int, int],
        input_image_size: Tuple[int, int, int],
        mask_in_chans: int = 16,
        activation: Type[nn.Module] = nn.GELU,
        num_point_embeddings: int = 2,
    ) -> None:
        """
        Arguments:
          embed_dim: prompt embedding width (divisible by 3).
          image_embedding_size: the image embedding grid (8, 8, 8).
          input_image_size: the encoder's input cube (128, 128, 128); point coordinates are in its voxels.
          mask_in_chans: hidden channels of the mask downscaling network.
          activation: activation of the mask downscaling network.
          num_point_embeddings: 2 (negative, positive), or 4 with trained box-corner embeddings.
        """
        super().__init__()
        if embed_dim % 3:
            raise ValueError(f"prompt embedding width {embed_dim} is not divisible by 3")
        if num_point_embeddings not in (2, 4):
            raise ValueError(f"num_point_embeddings must be 2 or 4, got {num_point_embeddings}")
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * n for n in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def supports_boxes(self) -> bool:
        return len(self.point_embeddings) == 4

    def get_dense_pe(self) -> torch.Tensor:
        """The positional encoding of the image-embedding grid: 1 x embed_dim x 8 x 8 x 8."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self.no_mask_embed.weight.dtype)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """B x N x 3 voxel coordinates, B x N labels (1 positive, 0 negative, -1 none) -> B x N' x C."""
        points = points.float() + 0.5  # voxel index -> voxel centre
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 3))], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        embedding = embedding.to(self.no_mask_embed.weight.dtype)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, torch.zeros_like(embedding), embedding)
        embedding = embedding + (labels == -1) * self.not_a_point_embed.weight
        embedding = embedding + (labels == 0) * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1) * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """B x 6 boxes (corner, opposite corner; voxel coordinates) -> B x 2 x C."""
        if not self.supports_boxes:
            raise ValueError(
                "this model has no box embedding (the public FastSAM3D/SAM-Med3D weights have none); "
                "pass points, or use Session.add_box, which turns a box into point prompts"
            )
        corners = boxes.float().reshape(-1, 2, 3) + 0.5
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self.no_mask_embed.weight.dtype)
        corner_embeddings = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return embedding + corner_embeddings

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          points: (coords B x N x 3, labels B x N), coords in voxel indices of the 128^3 crop in
            (axis0, axis1, axis2) order, labels 1 positive / 0 negative / -1 ignored.
          boxes: B x 6 (two opposite corners, voxel indices), only for models with box embeddings.
          masks: B x 1 x 32 x 32 x 32 logits of the previous prediction.

        Returns:
          sparse embeddings B x N' x embed_dim (N' = N + 1 padding point when there is no box),
          dense embeddings B x embed_dim x 8 x 8 x 8.
        """
        batch = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty((batch, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 3 or labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"points must be coords (B, N, 3) and labels (B, N); got {tuple(coords.shape)} and {tuple(labels.shape)}"
                )
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            if masks.ndim != 5 or tuple(masks.shape[1:]) != (1, *self.mask_input_size):
                raise ValueError(f"mask prompt must have shape (B, 1, {', '.join(map(str, self.mask_input_size))}); got {tuple(masks.shape)}")
            dense = self.mask_downscaling(masks.to(weight.dtype))
        else:
            dense = weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense

    @staticmethod
    def _batch_size(
        points: Optional[Tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor], masks: Optional[torch.Tensor]
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1
