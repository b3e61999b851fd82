"""Segmentation losses: MONAI's DiceCELoss when MONAI is installed, else the same formula here."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def _soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 - soft Dice per sample (B x 1): probabilities and targets B x 1 x D x H x W."""
    dims = tuple(range(2, prob.ndim))
    return 1.0 - (2.0 * (prob * target).sum(dims) + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)


class _DiceCE(nn.Module):
    """Soft Dice (per sample, smoothing 1e-5) + binary cross-entropy, on logits; MONAI's DiceCELoss(sigmoid=True)."""

    def __init__(self, smooth: float = 1e-5, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits, target: B x 1 x D x H x W (target in [0, 1]) -> scalar."""
        dice = _soft_dice_loss(torch.sigmoid(logits), target, self.smooth)
        pos_weight = torch.tensor(self.pos_weight, device=logits.device) if self.pos_weight != 1.0 else None
        return dice.mean() + F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


class DiceFocal(nn.Module):
    """Soft Dice (per sample) + ``focal_weight`` x sigmoid focal loss (gamma, alpha), on logits.

    The focal term stops pushing background voxels once they are confidently negative, so a small
    target cannot be won by predicting nothing (the "empty mask" collapse of DiceCE from scratch).
    SAM used focal:dice = 20:1 with gamma 2, alpha 0.25.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, focal_weight: float = 20.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.gamma, self.alpha, self.focal_weight, self.smooth = gamma, alpha, focal_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits, target: B x 1 x D x H x W (target in [0, 1]) -> scalar."""
        prob = torch.sigmoid(logits)
        dice = _soft_dice_loss(prob, target, self.smooth)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = prob * target + (1.0 - prob) * (1.0 - target)
        alpha_t = self.alpha * target + (1.0 - self.alpha) * (1.0 - target)
        focal = (alpha_t * (1.0 - p_t) ** self.gamma * ce).mean()
        return dice.mean() + self.focal_weight * focal


class DiceBalancedCE(nn.Module):
    """Soft Dice (per sample) + class-balanced cross-entropy: half the CE weight on the foreground, half on the background.

    Per sample, foreground voxels share weight 0.5 and background voxels 0.5 (soft targets split
    each voxel between the two), so a target of 0.1 % of the crop pulls as hard as its background.
    Fully balanced, the model learns to find small targets from scratch but over-segments them
    (an uncertain voxel is worth more as foreground); ``cap`` limits one foreground voxel to the
    weight of at most ``cap`` background voxels (a per-sample ``pos_weight = min(N_bg/N_fg, cap)``,
    then normalised like the balanced loss), which trades some of that back.
    """

    def __init__(self, smooth: float = 1e-5, cap: float = 0.0) -> None:
        super().__init__()
        self.smooth = smooth
        self.cap = cap

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits, target: B x 1 x D x H x W (target in [0, 1]) -> scalar."""
        dims = tuple(range(2, logits.ndim))
        dice = _soft_dice_loss(torch.sigmoid(logits), target, self.smooth)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        n_fg = target.sum(dims).clamp_min(1e-6)
        n_bg = (1.0 - target).sum(dims).clamp_min(1e-6)
        fg_sum, bg_sum = (target * ce).sum(dims), ((1.0 - target) * ce).sum(dims)
        if self.cap > 0:
            pos_weight = torch.minimum(n_bg / n_fg, torch.full_like(n_fg, self.cap))
            balanced = (pos_weight * fg_sum + bg_sum) / (pos_weight * n_fg + n_bg)
            return dice.mean() + balanced.mean()
        return dice.mean() + 0.5 * (fg_sum / n_fg + bg_sum / n_bg).mean()


def segmentation_loss(kind: str = "dicece", pos_weight: float = 1.0, balance_cap: float = 0.0) -> nn.Module:
    """"dicece" (:func:`dice_ce_loss`), "dicebalanced" (:class:`DiceBalancedCE`) or "dicefocal" (:class:`DiceFocal`)."""
    if kind == "dicefocal":
        return DiceFocal()
    if kind == "dicece":
        return dice_ce_loss(pos_weight)
    if kind == "dicebalanced":
        return DiceBalancedCE(cap=balance_cap)
    raise ValueError(f"loss must be 'dicece', 'dicebalanced' or 'dicefocal', got {kind!r}")


def dice_ce_loss(pos_weight: float = 1.0) -> nn.Module:
    """DiceCE on logits with targets in [0, 1]: ``monai.losses.DiceCELoss(sigmoid=True)`` if available.

    ``pos_weight`` > 1 weighs foreground voxels in the cross-entropy (against the all-background
    collapse on small targets); that variant is always the built-in one.
    """
    if pos_weight != 1.0:
        return _DiceCE(pos_weight=pos_weight)
    try:
        from monai.losses import DiceCELoss
    except ImportError:
        logger.info("MONAI not installed: using the built-in DiceCE (same formula)")
        return _DiceCE()
    return DiceCELoss(sigmoid=True)
