"""A masked autoencoder (He et al. 2022) for one-channel cryo-EM regions, built from timm's ViT pieces.

The encoder sees the visible 25 % of the patches (mask ratio 0.75) plus a class token; a light decoder
reconstructs every patch from the encoded visible ones and mask tokens, and the loss is the mean squared
error on the masked patches only. For picking, ``features`` runs the encoder on whole, unmasked windows.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from cryomae.model.presets import Preset


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding.  # [1, (1 +) grid*grid, dim]"""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be a multiple of 4 for a 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # [D/4]
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):  # the first half encodes rows, the second columns
        angles = np.outer(coord, omega)  # [L, D/4]
        parts += [np.sin(angles), np.cos(angles)]
    emb = np.concatenate(parts, axis=1)  # [L, D]
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """ViT encoder + light ViT decoder for one-channel square images of ``preset.img_size`` pixels."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.preset = preset
        p, d, dd = preset.patch_size, preset.embed_dim, preset.decoder_embed_dim
        self.patch_embed = PatchEmbed(preset.img_size, p, in_chans=1, embed_dim=d)
        grid = preset.img_size // p
        self.num_patches = grid * grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed: torch.Tensor
        self.decoder_pos_embed: torch.Tensor
        self.register_buffer("pos_embed", sincos_pos_embed(d, grid), persistent=False)
        self.blocks = nn.ModuleList(
            Block(d, preset.num_heads, preset.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(preset.depth)
        )
        self.norm = nn.LayerNorm(d)

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, preset.decoder_num_heads, preset.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(preset.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, p * p)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W] -> [N, L, p*p]"""
        p = self.preset.patch_size
        n, _, h, w = imgs.shape
        x = imgs.reshape(n, h // p, p, w // p, p)
        return x.permute(0, 1, 3, 2, 4).reshape(n, (h // p) * (w // p), p * p)

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample.

        x: [N, L, D] -> (visible [N, L_keep, D], mask [N, L] with 1 = masked, ids_restore [N, L]).
        """
        n, length, d = x.shape
        keep = max(1, round(length * (1 - mask_ratio)))
        noise = torch.rand(n, length, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def _embed(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, 1, H, W] -> (tokens with class token [N, 1 + L_keep, D], mask [N, L], ids_restore [N, L])."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        else:
            n, length, _ = x.shape
            mask = torch.zeros(n, length, device=x.device)
            ids_restore = torch.arange(length, device=x.device).expand(n, -1)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, 1, H, W] -> (tokens [N, 1 + L_keep, D], feature-layer tokens, mask [N, L], ids_restore)."""
        x, mask, ids_restore = self._embed(imgs, mask_ratio, generator)
        layer = self.preset.feature_layer
        feat = x
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i + 1 == layer:
                feat = x
        x = self.norm(x)
        if layer < 0 or layer > len(self.blocks):
            feat = x
        return x, feat, mask, ids_restore

    def _feature_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked tokens of the feature layer, running only the blocks it needs: [N, 1 + L, D]."""
        x, _, _ = self._embed(imgs, 0.0)
        layer = self.preset.feature_layer
        if 0 <= layer <= len(self.blocks):
            for blk in self.blocks[:layer]:
                x = blk(x)
            return x
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """tokens [N, 1 + L_keep, D] -> predicted pixels per patch [N, L, p*p]."""
        x = self.decoder_embed(tokens)  # [N, 1 + L_keep, Dd]
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], masks], dim=1)  # [N, L, Dd]
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def reconstruction_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (L_MSE)."""
        target = self.patchify(imgs)
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The latent feature of a region: tokens [N, 1 + L, D] -> [N, D] (see ``Preset.feature``)."""
        if self.preset.feature == "cls":
            return tokens[:, 0]
        if self.preset.feature == "flat":
            return tokens[:, 1:].flatten(1)  # [N, L * D]
        return tokens[:, 1:].mean(dim=1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked reconstruction: imgs [N, 1, H, W] -> (L_MSE, latent features of the masked input [N, D])."""
        tokens, feat, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        pred = self.forward_decoder(tokens, ids_restore)
        if self.preset.feature == "flat" and mask_ratio > 0:
            # Put the visible tokens back at their positions (zeros where masked) so that the flattened
            # feature keeps one layout for every sample: [N, 1 + L, D]
            n, length = ids_restore.shape
            vis = feat[:, 1:]
            full = torch.cat([vis, vis.new_zeros(n, length - vis.shape[1], vis.shape[2])], dim=1)
            full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, vis.shape[2]))
            feat = torch.cat([feat[:, :1], full], dim=1)
        return self.reconstruction_loss(imgs, pred, mask), self.pool(feat)

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder features of whole (unmasked) regions, with gradients (SCS training): [N, 1, H, W] -> [N, D]."""
        return self.pool(self._feature_tokens(imgs))

    @torch.no_grad()
    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """``encode`` without gradients (picking, the exemplar bank)."""
        return self.encode(imgs)
