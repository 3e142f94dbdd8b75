"""Model registry: build each component from a profile (cf. timm's ``create_model``)."""

from __future__ import annotations

from functools import partial

from timm.layers import GroupNorm
from torch import nn

from training.config import COMPONENTS, Profile
from training.models.mae import MaskedAutoencoder
from training.models.moe import MixtureOfExperts
from training.models.unet import UNet


def create_model(component: str, profile: Profile) -> nn.Module:
    """The ``component`` (classifier | detector | denoiser) at the sizes of ``profile``."""
    if component == "classifier":
        c = profile.classifier
        kwargs = dict(c.backbone_kwargs)
        if c.norm == "group":
            kwargs["norm_layer"] = partial(GroupNorm, num_groups=c.norm_groups)
        return MixtureOfExperts(
            c.backbone, c.num_experts, c.num_classes, c.head_hidden, c.gate_hidden, c.drop, kwargs
        )
    if component == "detector":
        d = profile.detector
        return MaskedAutoencoder(
            profile.image_size, d.patch, d.enc_depth, d.enc_width, d.enc_heads,
            d.dec_depth, d.dec_width, d.dec_heads, d.mlp_ratio,
        )
    if component == "denoiser":
        u = profile.denoiser
        return UNet(u.base_channels, tuple(u.channel_mults), u.time_dim)
    raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")


__all__ = ["create_model", "MixtureOfExperts", "MaskedAutoencoder", "UNet"]
