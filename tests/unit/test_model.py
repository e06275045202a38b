"""The masked autoencoder: patchify, random masking, forward/features shapes, position embedding, presets."""

import dataclasses

import numpy as np
import pytest
import torch

from cryomae.model.mae import MaskedAutoencoder, sincos_pos_embed
from cryomae.model.presets import PRESETS, Preset, get_preset

TEST = PRESETS["test"]  # 24 px windows, 8 px patches: L = 9 tokens of width 64


def _model(preset: Preset = TEST, seed: int = 0, **changes) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(dataclasses.replace(preset, **changes) if changes else preset).eval()


def _images(n: int, size: int = TEST.img_size, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ patchify


def test_patchify_shape_and_row_major_patch_order():
    model = _model()
    p = TEST.patch_size
    imgs = _images(3)
    patches = model.patchify(imgs)
    grid = TEST.img_size // p
    assert tuple(patches.shape) == (3, grid * grid, p * p)
    for i in range(grid):
        for j in range(grid):
            expected = imgs[:, 0, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(3, -1)
            assert torch.equal(patches[:, i * grid + j], expected), (i, j)


# ------------------------------------------------------------------------------------------- random masking


@pytest.mark.parametrize("length", [9, 16, 49, 196])
def test_random_masking_keeps_a_quarter_and_ids_restore_inverts_the_shuffle(length):
    n, d = 4, 6
    # token l of every sample holds the value l in all its channels, so a token's identity is readable
    x = torch.arange(length, dtype=torch.float32)[None, :, None].expand(n, length, d).contiguous()
    visible, mask, ids_restore = MaskedAutoencoder.random_masking(x, 0.75, torch.Generator().manual_seed(1))
    keep = round(length * 0.25)
    assert tuple(visible.shape) == (n, keep, d)
    assert tuple(mask.shape) == (n, length)
    assert tuple(ids_restore.shape) == (n, length)
    assert torch.equal(mask.sum(dim=1), torch.full((n,), float(length - keep)))
    for k in range(n):
        kept = sorted(int(v) for v in visible[k, :, 0])
        assert kept == sorted(int(i) for i in torch.nonzero(mask[k] == 0).ravel()), "mask 0 = the visible tokens"
        assert sorted(ids_restore[k].tolist()) == list(range(length)), "ids_restore is a permutation"
    # ids_restore undoes the shuffle: the shuffled sequence starts with the visible tokens, and gathering it
    # with ids_restore gives back the original order
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, d))
    assert torch.equal(shuffled[:, :keep], visible)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, d)), x)


def test_random_masking_differs_per_sample_and_repeats_with_a_seeded_generator():
    x = torch.randn(8, 16, 4)
    _, m1, r1 = MaskedAutoencoder.random_masking(x, 0.75, torch.Generator().manual_seed(5))
    _, m2, r2 = MaskedAutoencoder.random_masking(x, 0.75, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    assert len({tuple(row.tolist()) for row in m1}) > 1, "every sample should get its own mask"


# ---------------------------------------------------------------------------------------- forward / features


@pytest.mark.parametrize("feature", ["mean", "cls", "flat"])
def test_forward_returns_scalar_loss_and_features(feature):
    model = _model(feature=feature).train()
    imgs = _images(5)
    loss, feats = model(imgs, 0.75, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert feats.shape[0] == 5 and feats.ndim == 2
    if feature != "flat":
        assert tuple(feats.shape) == (5, TEST.embed_dim)


@pytest.mark.parametrize(
    "feature",
    [
        "mean",
        "cls",
        "flat",
    ],
)
def test_forward_features_have_the_width_of_unmasked_features(feature):
    """The latent feature of the masked input lives in the same space as that of the whole region."""
    model = _model(feature=feature)
    imgs = _images(4)
    _, masked = model(imgs, 0.75, torch.Generator().manual_seed(0))
    assert masked.shape == model.features(imgs).shape


@pytest.mark.parametrize(("feature", "width"), [("mean", 64), ("cls", 64), ("flat", 9 * 64)])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_features_are_deterministic_and_independent_of_the_batch(feature, width, layer):
    model = _model(feature=feature, feature_layer=layer)
    imgs = _images(6, seed=3)
    batch = model.features(imgs)
    assert tuple(batch.shape) == (6, width)
    assert torch.equal(model.features(imgs), batch), "two calls on the same batch must agree exactly"
    alone = model.features(imgs[2:3])
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=0)
    reordered = model.features(imgs.flip(0))
    torch.testing.assert_close(reordered.flip(0), batch, atol=1e-5, rtol=0)
    # encode() is the same computation with gradients
    torch.testing.assert_close(model.encode(imgs).detach(), batch, atol=1e-6, rtol=0)


def test_features_see_where_things_are_with_flat_pooling():
    """'flat' keeps the spatial order: a window and its mirror image get different features."""
    model = _model(feature="flat")
    img = _images(1, seed=4)
    f, g = model.features(img), model.features(img.flip(-1))
    assert not torch.allclose(f, g, atol=1e-3)


def test_features_differ_between_different_windows():
    model = _model()
    f = model.features(_images(4, seed=5))
    cos = torch.nn.functional.cosine_similarity(f[:, None], f[None], dim=-1)
    off_diag = cos[~torch.eye(4, dtype=torch.bool)]
    assert float(off_diag.max()) < 0.99


# ------------------------------------------------------------------------------------- position embedding


def test_sincos_pos_embed_shape_and_distinct_rows():
    dim, grid = 64, 5
    emb = sincos_pos_embed(dim, grid)
    assert tuple(emb.shape) == (1, 1 + grid * grid, dim)
    assert emb.dtype == torch.float32
    assert torch.equal(emb[0, 0], torch.zeros(dim)), "the class token gets a zero embedding"
    rows = emb[0, 1:]
    dist = torch.cdist(rows, rows)
    assert float(dist[~torch.eye(grid * grid, dtype=torch.bool)].min()) > 1e-3, "every patch position is distinct"
    assert tuple(sincos_pos_embed(dim, grid, cls_token=False).shape) == (1, grid * grid, dim)
    torch.testing.assert_close(sincos_pos_embed(dim, grid, cls_token=False)[0], rows)


def test_sincos_pos_embed_first_half_encodes_the_row_second_half_the_column():
    dim, grid = 32, 4
    emb = sincos_pos_embed(dim, grid, cls_token=False)[0].reshape(grid, grid, dim)
    half = dim // 2
    for r in range(grid):
        assert torch.equal(emb[r, :, :half], emb[r, :1, :half].expand(grid, -1)), "same row, same first half"
    for c in range(grid):
        assert torch.equal(emb[:, c, half:], emb[:1, c, half:].expand(grid, -1)), "same column, same second half"
    assert not torch.equal(emb[0, 0, :half], emb[1, 0, :half])
    assert not torch.equal(emb[0, 0, half:], emb[0, 1, half:])


def test_sincos_pos_embed_rejects_a_dim_not_divisible_by_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed(30, 3)


# ------------------------------------------------------------------------------------------------- presets


def test_paper_preset_is_vit_b16_at_224_with_the_mae_decoder():
    p = PRESETS["paper"]
    assert (p.img_size, p.patch_size) == (224, 16)
    assert (p.embed_dim, p.depth, p.num_heads) == (768, 12, 12)
    assert (p.decoder_embed_dim, p.decoder_depth, p.decoder_num_heads) == (512, 8, 16)
    assert p.mlp_ratio == 4.0
    assert p.tokens == 196


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_consistent_and_builds(name):
    p = get_preset(name)
    assert p.name == name
    assert p.img_size % p.patch_size == 0
    assert p.embed_dim % p.num_heads == 0 and p.embed_dim % 4 == 0
    assert p.decoder_embed_dim % p.decoder_num_heads == 0 and p.decoder_embed_dim % 4 == 0
    assert p.feature in ("mean", "cls", "flat")
    model = _model(p)
    assert model.num_patches == p.tokens
    assert len(model.blocks) == p.depth and len(model.decoder_blocks) == p.decoder_depth
    assert model.decoder_pred.out_features == p.patch_size**2
    assert Preset(**p.to_dict()) == p, "to_dict round-trips (the checkpoint manifest relies on it)"
    if name == "paper":
        return  # ViT-B forward on the CPU is too slow for a unit test; the architecture is checked above
    imgs = _images(2, size=p.img_size)
    loss, _ = model(imgs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.features(imgs).shape[0] == 2


def test_get_preset_names_the_choices_for_an_unknown_name():
    with pytest.raises(KeyError, match="choose one of") as info:
        get_preset("huge")
    assert all(name in str(info.value) for name in PRESETS)


def test_reconstruction_loss_counts_only_masked_patches():
    model = _model()
    imgs = _images(2)
    target = model.patchify(imgs)
    mask = torch.zeros(2, TEST.tokens)
    mask[:, ::2] = 1.0  # every other patch masked
    pred = target.clone()
    pred[:, 1::2] += 10.0  # wrong only where the patches were visible
    assert float(model.reconstruction_loss(imgs, pred, mask)) == pytest.approx(0.0, abs=1e-7)
    pred[:, ::2] += 1.0  # now wrong by exactly 1 on every masked pixel
    assert float(model.reconstruction_loss(imgs, pred, mask)) == pytest.approx(1.0, rel=1e-5)
    assert np.isfinite(float(model.reconstruction_loss(imgs, pred, torch.zeros_like(mask))))
