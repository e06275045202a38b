"""Named model presets, in the manner of timm's model registry: every hyperparameter of a variant inline.

``paper`` is the CryoMAE paper's model (ViT-B/16 at 224 px with the MAE paper's 8-block, 512-wide decoder).
The smaller presets trade resolution of the window for speed; ``test`` exists only so CI can train in seconds.
Measurements behind the choices are in docs/performance.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True, kw_only=True)
class Preset:
    """The architecture of one MAE variant."""

    name: str
    img_size: int  # side of the (resampled) window in model pixels
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    # The latent feature of a region: "mean" of the patch tokens, the "cls" token, or "flat", all patch
    # tokens concatenated in their spatial order (so the feature knows where in the window things are)
    feature: Literal["mean", "cls", "flat"] = "flat"
    # Which encoder layer gives the latent feature: 0 = the patch embedding, k = after k transformer blocks,
    # -1 = the last block after the final norm (the usual MAE latent).
    feature_layer: int = 0
    description: str = ""

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="paper",
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            decoder_embed_dim=512,
            decoder_depth=8,
            decoder_num_heads=16,
            description="ViT-B/16 at 224 px with the MAE paper's decoder, as in the CryoMAE paper (GPU only)",
        ),
        Preset(
            name="base",
            img_size=64,
            patch_size=8,
            embed_dim=384,
            depth=8,
            num_heads=6,
            decoder_embed_dim=256,
            decoder_depth=2,
            decoder_num_heads=8,
            description="64 px windows, 8x8 patches, 384-wide 8-block encoder: GPU default",
        ),
        Preset(
            name="small",
            img_size=48,
            patch_size=8,
            embed_dim=192,
            depth=6,
            num_heads=3,
            decoder_embed_dim=128,
            decoder_depth=2,
            decoder_num_heads=4,
            description="48 px windows, 8x8 patches (36 tokens), ViT-Tiny-width 6-block encoder",
        ),
        Preset(
            name="fast",
            img_size=32,
            patch_size=8,
            embed_dim=128,
            depth=4,
            num_heads=4,
            decoder_embed_dim=64,
            decoder_depth=1,
            decoder_num_heads=4,
            description="32 px windows, 8x8 patches (16 tokens), 128-wide 4-block encoder: the CPU default",
        ),
        Preset(
            name="test",
            img_size=24,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=2,
            description="tiny model for tests and CI only",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
