"""The two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import Tensor, nn

from ..attention import attention
from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may narrow the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.0) -> None:
        """
        Arguments:
          embedding_dim: input and output width.
          num_heads: heads; must divide embedding_dim / downsample_rate.
          downsample_rate: internal width = embedding_dim / downsample_rate.
          dropout: dropout on the attention output (used for MC-dropout uncertainty).
        """
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout)

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: B x Nq x C, k and v: B x Nk x C -> B x Nq x C."""
        out = attention(
            self._separate_heads(self.q_proj(q)),
            self._separate_heads(self.k_proj(k)),
            self._separate_heads(self.v_proj(v)),
        )
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.internal_dim)
        return self.dropout(self.out_proj(out))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        dropout: float = 0.0,
    ) -> None:
        """
        Arguments:
          embedding_dim: token width.
          num_heads: attention heads.
          mlp_dim: hidden width of the token MLP.
          activation: MLP activation.
          attention_downsample_rate: width reduction inside the cross-attentions.
          skip_first_layer_pe: the first block's self-attention sees no positional encoding and
            has no residual.
          dropout: dropout in the attentions and MLP (MC-dropout).
        """
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation, dropout)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        """queries B x Nt x C, keys B x Ni x C (+ their encodings) -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """A stack of :class:`TwoWayAttentionBlock` and a final token->image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        dropout: float = 0.0,
    ) -> None:
        """
        Arguments:
          depth: number of two-way blocks.
          embedding_dim: token width.
          num_heads: attention heads.
          mlp_dim: hidden width of the token MLPs.
          activation: MLP activation.
          attention_downsample_rate: width reduction inside the cross-attentions.
          dropout: dropout in attentions and MLPs (MC-dropout).
        """
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                dropout=dropout,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Arguments:
          image_embedding: B x C x X x Y x Z.
          image_pe: B x C x X x Y x Z.
          point_embedding: B x Nt x C (output tokens followed by prompt tokens).

        Returns:
          the processed tokens B x Nt x C and image tokens B x (X*Y*Z) x C.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys
