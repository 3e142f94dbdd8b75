"""ViT masked autoencoder for one-channel scans (the detector).

Masks are inputs: ``mask [N, L]`` bool, True = hidden from the encoder. Every
row must hide the same number of patches. The detection score is computed
over a fixed set of complementary masks (:func:`complementary_masks`) so that
each patch is reconstructed, and counted, exactly once.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from training.models.common import Normalize


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[grid*grid, dim]`` (as in MAE)."""
    if dim % 4:
        raise ValueError(f"embedding width must be a multiple of 4, got {dim}")
    coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="xy")).reshape(2, -1)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    parts = []
    for c in coords:  # x then y
        out = np.einsum("m,d->md", c.astype(np.float64), omega)
        parts += [np.sin(out), np.cos(out)]
    return torch.from_numpy(np.concatenate(parts, 1)).float()


class MaskedAutoencoder(nn.Module):
    """``forward(x, mask)``: ``x [N, 1, H, W]`` in [0, 1] -> reconstructed patches ``[N, L, p*p]`` in pixel units."""

    def __init__(
        self,
        img_size: int = 224,
        patch: int = 16,
        enc_depth: int = 12,
        enc_width: int = 512,
        enc_heads: int = 8,
        dec_depth: int = 8,
        dec_width: int = 512,
        dec_heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.grid = img_size // patch
        self.num_patches = self.grid**2
        self.normalize = Normalize()

        self.patch_embed = nn.Conv2d(1, enc_width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, enc_width))
        self.register_buffer("enc_pos", sincos_pos_embed(enc_width, self.grid)[None], persistent=False)
        self.encoder = nn.Sequential(*[Block(enc_width, enc_heads, mlp_ratio, qkv_bias=True) for _ in range(enc_depth)])
        self.enc_norm = nn.LayerNorm(enc_width)

        self.dec_embed = nn.Linear(enc_width, dec_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
        self.register_buffer("dec_pos", sincos_pos_embed(dec_width, self.grid)[None], persistent=False)
        self.decoder = nn.Sequential(*[Block(dec_width, dec_heads, mlp_ratio, qkv_bias=True) for _ in range(dec_depth)])
        self.dec_norm = nn.LayerNorm(dec_width)
        self.dec_pred = nn.Linear(dec_width, patch * patch)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` -> ``[N, L, p*p]``."""
        n, p, g = x.shape[0], self.patch, self.grid
        return x.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, g * g, p * p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, L, p*p]`` -> ``[N, 1, H, W]``."""
        n, p, g = patches.shape[0], self.patch, self.grid
        return patches.reshape(n, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(n, 1, g * p, g * p)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the visible patches. Returns (latent ``[N, 1+V, D]``, restore order ``[N, L]``)."""
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2) + self.enc_pos  # [N, L, D]
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, in patch order
        restore = torch.argsort(order, dim=1)
        n_visible = self.num_patches - int(mask[0].sum())
        keep = order[:, :n_visible]
        tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        latent = self.enc_norm(self.encoder(torch.cat([cls, tokens], 1)))
        return latent, restore

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Latent of visible patches -> predictions for all ``L`` patches ``[N, L, p*p]``."""
        h = self.dec_embed(latent)
        n, v = h.shape[0], h.shape[1] - 1
        fill = self.mask_token.expand(n, self.num_patches - v, -1)
        h_ = torch.cat([h[:, 1:], fill], 1)
        h_ = torch.gather(h_, 1, restore[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :1], h_], 1) + torch.cat([torch.zeros_like(self.dec_pos[:, :1]), self.dec_pos], 1)
        h = self.dec_norm(self.decoder(h))
        return self.dec_pred(h[:, 1:])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.dim() == 1:
            mask = mask[None].expand(x.shape[0], -1)
        latent, restore = self.encode(x, mask)
        return self.decode(latent, restore)

    def patch_errors(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction error per patch ``[N, L]`` (pixel units)."""
        return (self(x, mask) - self.patchify(x)).pow(2).mean(-1)

    def score(self, x: torch.Tensor, masks: torch.Tensor, responsible: torch.Tensor) -> torch.Tensor:
        """Detection score ``[N]``: mean squared error with each patch counted once.

        ``masks``/``responsible`` ``[M, L]`` bool from :func:`complementary_masks`:
        under mask m the error of the patches in ``responsible[m]`` is counted.
        """
        total = x.new_zeros(x.shape[0])
        for m in range(masks.shape[0]):
            err = self.patch_errors(x, masks[m])
            total = total + (err * responsible[m].to(err.dtype)).sum(1)
        return total / self.num_patches


def random_masks(n: int, num_patches: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent random masks ``[n, L]`` bool hiding ``round(ratio * L)`` patches each (training)."""
    n_mask = int(round(ratio * num_patches))
    noise = torch.rand(n, num_patches, generator=generator)
    ranks = noise.argsort(1).argsort(1)
    return ranks < n_mask


def complementary_masks(num_patches: int, ratio: float = 0.75, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of M = round(1 / (1 - ratio)) masks for a deterministic score.

    The visible sets of the M masks partition the patches (a fixed random
    permutation cut in M parts), so each mask hides about ``ratio`` of them,
    like in training. Patch p, visible under mask k, is hidden under every
    other mask; it is *counted* under mask (k + 1) mod M only. Returns
    (masks ``[M, L]``, responsible ``[M, L]``), both bool; ``responsible``
    is a partition of the patches and ``responsible <= masks``.
    """
    m = int(round(1.0 / (1.0 - ratio)))
    if m < 2:
        raise ValueError(f"mask ratio {ratio} gives fewer than two complementary masks")
    perm = torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))
    visible = torch.zeros(m, num_patches, dtype=torch.bool)
    for k, chunk in enumerate(torch.tensor_split(perm, m)):
        visible[k, chunk] = True
    masks = ~visible
    responsible = visible.roll(1, dims=0)
    return masks, responsible
