from .image_encoder import BLOCK_KINDS, Block, ImageEncoderViT3D, PatchEmbed3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D, select_by_iou
from .transformer import TwoWayTransformer

__all__ = [
    "BLOCK_KINDS",
    "Block",
    "ImageEncoderViT3D",
    "MaskDecoder3D",
    "PatchEmbed3D",
    "PromptEncoder3D",
    "Sam3D",
    "TwoWayTransformer",
    "select_by_iou",
]
