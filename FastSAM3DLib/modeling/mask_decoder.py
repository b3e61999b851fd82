"""Predicts 32^3 mask logits and their IoU from an image embedding and prompt embeddings."""

from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d
from .transformer import TwoWayTransformer


class MLP(nn.Module):
    """A plain MLP with ReLU between its ``num_layers`` linear layers."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        widths = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + widths, widths + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """... x input_dim -> ... x output_dim."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder3D(nn.Module):
    """SAM's mask decoder in 3D: two-way transformer, transposed-conv upscaling, hypernetwork heads."""

    def __init__(
        self,
        *,
        transformer_dim: int = 384,
        num_multimask_outputs: int = 3,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        """
        Arguments:
          transformer_dim: token and image-embedding width.
          num_multimask_outputs: masks predicted besides the single-mask output.
          transformer_depth, transformer_heads, transformer_mlp_dim: the two-way transformer.
          activation: activation of the upscaling network.
          iou_head_depth, iou_head_hidden_dim: the IoU prediction MLP.
          dropout: dropout inside the transformer (MC-dropout); 0 for the public weights.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer(
            depth=transformer_depth,
            embedding_dim=transformer_dim,
            num_heads=transformer_heads,
            mlp_dim=transformer_mlp_dim,
            dropout=dropout,
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embeddings: B_img x C x 8 x 8 x 8 (B_img = 1 is broadcast to the prompt batch).
          image_pe: 1 x C x 8 x 8 x 8, from ``prompt_encoder.get_dense_pe()``.
          sparse_prompt_embeddings: B x N x C.
          dense_prompt_embeddings: B x C x 8 x 8 x 8.
          multimask_output: return the 3 disambiguating masks instead of mask 0.

        Returns:
          low-res mask logits B x M x 32 x 32 x 32 and predicted IoU B x M (M = 1, or 3).
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: logits B x 4 x 32 x 32 x 32 and IoU B x 4."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)

        src = image_embeddings
        if src.shape[0] != batch:
            src = torch.repeat_interleave(src, batch // src.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = image_pe
        if pos_src.shape[0] != batch:
            pos_src = torch.repeat_interleave(pos_src, batch // pos_src.shape[0], dim=0)
        b, c, x, y, z = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, x, y, z = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, x * y * z)).reshape(b, -1, x, y, z)
        return masks, self.iou_prediction_head(iou_token_out)
