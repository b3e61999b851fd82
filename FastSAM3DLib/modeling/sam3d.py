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

    def uses_multimask(self, labels: torch.Tensor, first: bool) -> bool:
        """SAM's ambiguity rule: whether this decode should pick among the multimask outputs.

        A lone positive click does not say which of the nested structures around it is meant
        (putamen or striatum, a lobe or the brain), and a single-mask model answers with their
        average. Models trained for it (``config["first_click_multimask"]``) predict three
        candidates for a first decode from one positive click; :func:`select_by_iou` keeps one.

        Arguments:
          labels: B x N point labels of the decode.
          first: no previous logits are fed back.
        """
        single_positive = labels.shape[-1] == 1 and bool((labels == 1).all())
        return bool(self.config.get("first_click_multimask")) and first and single_positive


def select_by_iou(logits: torch.Tensor, iou: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's candidate with the highest predicted IoU.

    Arguments:
      logits: B x M x 32 x 32 x 32 candidate mask logits.
      iou: B x M predicted IoU.

    Returns:
      logits B x 1 x 32 x 32 x 32 and predicted IoU B x 1.
    """
    best = iou.argmax(dim=1)
    rows = torch.arange(iou.shape[0], device=iou.device)
    return logits[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)
