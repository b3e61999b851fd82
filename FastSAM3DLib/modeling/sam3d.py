"""The model: image encoder, prompt encoder and mask decoder, as the public checkpoints lay them out."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """Holds ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` (state-dict prefixes of the public files).

    ``config`` records the architecture the model was built from (see :mod:`FastSAM3DLib.build`),
    so it can be saved beside the weights and rebuilt exactly.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        config: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config: Dict[str, Any] = dict(config or {})

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def low_res_size(self) -> Tuple[int, int, int]:
        return self.prompt_encoder.mask_input_size

    def decode(
        self,
        image_embeddings: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_logits: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder in one call.

        Arguments:
          image_embeddings: 1 x C x 8 x 8 x 8 (or B x ...).
          coords: B x N x 3 voxel indices in the 128^3 crop.
          labels: B x N, 1 positive / 0 negative / -1 ignored.
          mask_logits: B x 1 x 32 x 32 x 32 previous logits, or None.
          multimask_output: see :class:`MaskDecoder3D`.

        Returns:
          low-res logits B x M x 32 x 32 x 32 and predicted IoU B x M.
        """
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_logits)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
