"""The "gated_pixelcnn" backbone and its blocks (``discretelik.nn.gated``): exact stack
footprints, causality, no blind spot, conditioning, and learning / sampling through ``build``
with every registered head.

``test_combinations.py`` already trains and samples every backbone x head unconditionally; the
learning and sampling tests here use the class- and map-conditional model.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discretelik as dl
from discretelik.backbones.gated_pixelcnn import GatedPixelCNN
from discretelik.data import load_bundled
from discretelik.nn.gated import (
    ConditionBias,
    HorizontalConv2d,
    VerticalConv2d,
    gated_activation,
)
from discretelik.testing import check_causality, receptive_field

NAME = "gated_pixelcnn"
HEADS = dl.list_heads()


def tiny(**kwargs) -> GatedPixelCNN:
    torch.manual_seed(0)
    return dl.create_backbone(NAME, preset="tiny", **kwargs)


def tiny_model(head: str, **kwargs) -> dl.AutoregressiveModel:
    torch.manual_seed(0)
    return dl.build(NAME, head, preset="tiny", **kwargs)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- blocks ---------------------------------------------------------------------------------


def test_gated_activation() -> None:
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(gated_activation(x), torch.tanh(x[:, :3]) * torch.sigmoid(x[:, 3:]))
    with pytest.raises(ValueError, match="even"):
        gated_activation(torch.randn(1, 5, 2, 2))


def footprint(conv: torch.nn.Module, size: int, pos: tuple[int, int]) -> torch.Tensor:
    """Input pixels that the output at ``pos`` reads (gradient of a ones-weight layer)."""
    torch.nn.init.ones_(conv.weight)
    x = torch.zeros(1, conv.in_channels, size, size, requires_grad=True)
    conv(x)[0, :, pos[0], pos[1]].sum().backward()
    return x.grad[0].sum(0) != 0


@pytest.mark.parametrize("k", [3, 5, 7])
def test_stack_footprints(k: int) -> None:
    r, (i, j) = k // 2, (4, 4)
    vertical = torch.zeros(9, 9, dtype=torch.bool)
    vertical[i - r : i + 1, j - r : j + r + 1] = True
    assert torch.equal(footprint(VerticalConv2d(2, 3, k), 9, (i, j)), vertical)
    row_b = torch.zeros(9, 9, dtype=torch.bool)
    row_b[i, j - r : j + 1] = True
    assert torch.equal(footprint(HorizontalConv2d(2, 3, k, "B"), 9, (i, j)), row_b)
    row_a = row_b.clone()
    row_a[i, j] = False  # type A: never the current pixel
    assert torch.equal(footprint(HorizontalConv2d(2, 3, k, "A"), 9, (i, j)), row_a)


@pytest.mark.parametrize("k", [2, 1, 4])
def test_stack_kernel_must_be_odd(k: int) -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        VerticalConv2d(1, 1, k)
    with pytest.raises(ValueError, match="kernel_size"):
        HorizontalConv2d(1, 1, k)


def test_condition_bias_nearest_keeps_codes_blockwise() -> None:
    torch.manual_seed(0)
    bias = ConditionBias(4, num_classes=3, cond_channels=5, upsample="nearest")
    codes = torch.nn.functional.one_hot(torch.tensor([[[0, 4], [2, 1]]]), 5).permute(0, 3, 1, 2)
    out = bias(torch.tensor([1]), codes.float(), (4, 4))  # (1, 4, 4, 4)
    assert out.shape == (1, 4, 4, 4)
    # Each code covers a 2x2 block of the image.
    blocks = out.unfold(2, 2, 2).unfold(3, 2, 2)  # (1, 4, 2, 2, 2, 2)
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))
    assert bias(None, None, (4, 4)) is None
    assert bias(torch.tensor([2]), None, (4, 4)).shape == (1, 4, 1, 1)
    with pytest.raises(ValueError, match="upsample"):
        ConditionBias(4, cond_channels=1, upsample="area")


# -- config and presets ---------------------------------------------------------------------


def test_presets() -> None:
    assert dl.backbone_presets(NAME) == ["paper", "tiny"]
    assert n_params(tiny()) < 5_000
    paper = dl.backbone_config(NAME, "paper")
    assert (paper.n_layers, paper.hidden_channels, paper.kernel_size) == (20, 384, 5)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = dl.create_backbone(NAME, preset="paper")
    assert n_params(net) == 116_092_672
    assert not GatedPixelCNN.supports_channel_groups


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        (dict(kernel_size=4), ValueError, "kernel_size"),
        (dict(kernel_size=1), ValueError, "kernel_size"),
        (dict(n_layers=0), ValueError, "n_layers"),
        (dict(hidden_channels=2.5), TypeError, "hidden_channels"),
        (dict(skip_connections=1), TypeError, "skip_connections"),
        (dict(cond_channels=0), ValueError, "cond_channels"),
        (dict(cond_upsample="area"), ValueError, "cond_upsample"),
        (dict(channel_groups=3), ValueError, "channel_groups"),  # not an option: whole pixels
    ],
)
def test_bad_config_names_the_field(kwargs: dict, error: type, field: str) -> None:
    with pytest.raises(error, match=field):
        dl.create_backbone(NAME, preset="tiny", **kwargs)


# -- causality ------------------------------------------------------------------------------


def positions(h: int, w: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    pixel = st.tuples(st.integers(0, h - 1), st.integers(0, w - 1))
    return st.lists(pixel, min_size=1, max_size=6, unique=True)


@settings(max_examples=25)
@given(
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    channels=st.sampled_from([1, 3]),
    kernel_size=st.sampled_from([3, 5]),
    skip=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_backbone_is_causal(
    h: int, w: int, channels: int, kernel_size: int, skip: bool, seed: int, data: st.DataObject
) -> None:
    net = tiny(in_channels=channels, kernel_size=kernel_size, skip_connections=skip)
    check_causality(net, (channels, h, w), data.draw(positions(h, w)), seed=seed)


def test_conditional_backbone_is_causal() -> None:
    net = tiny(num_classes=4, cond_channels=2, cond_upsample="bilinear")
    cond = {"label": torch.tensor([1]), "map": torch.randn(1, 2, 3, 2)}
    check_causality(net, (3, 6, 5), cond=cond)


@pytest.mark.parametrize("head", HEADS)
def test_model_is_causal_with_every_head(head: str) -> None:
    model = tiny_model(head)
    assert model.backbone.channel_groups == 1  # whole previous pixels, whatever the head

    @settings(max_examples=8)
    @given(h=st.integers(3, 9), w=st.integers(3, 9), seed=st.integers(0, 2**16), data=st.data())
    def check(h: int, w: int, seed: int, data: st.DataObject) -> None:
        check_causality(model, (3, h, w), data.draw(positions(h, w)), seed=seed)

    check()


# -- receptive field: no blind spot ---------------------------------------------------------


def earlier_within_reach(size: int, pos: tuple[int, int], reach: int) -> torch.Tensor:
    """Every pixel before ``pos`` in raster order within ``reach`` columns either side and
    ``reach + 1`` rows up (the vertical stack's reach plus its one-row shift)."""
    i, j = pos
    rows = torch.arange(size)[:, None]
    cols = torch.arange(size)[None, :]
    near = (cols - j).abs() <= reach
    above = (rows < i) & (rows >= i - 1 - reach) & near
    left = (rows == i) & (cols < j) & (cols >= j - reach)
    return above | left


@pytest.mark.parametrize(
    ("n_layers", "kernel_size", "skip"), [(3, 3, False), (2, 5, True), (4, 3, True)]
)
@pytest.mark.parametrize("pos", [(4, 3), (7, 7), (0, 5), (5, 0), (2, 6)])
def test_no_blind_spot(n_layers: int, kernel_size: int, skip: bool, pos: tuple[int, int]) -> None:
    net = tiny(n_layers=n_layers, kernel_size=kernel_size, skip_connections=skip)
    field = receptive_field(net, (3, 8, 8), pos)
    assert torch.equal(field, earlier_within_reach(8, pos, n_layers * (kernel_size // 2)))


def test_no_blind_spot_where_pixelcnn_has_one() -> None:
    # The pixel one row up and four columns right, which the plain PixelCNN cannot see.
    field = receptive_field(tiny(n_layers=4), (3, 9, 9), (5, 4))
    assert field[4, 8]


# -- conditioning and input errors ----------------------------------------------------------


def test_label_changes_features() -> None:
    net = tiny(num_classes=4).eval()
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    a = net(x, torch.tensor([0, 0]))
    b = net(x, torch.tensor([1, 0]))
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_spatial_map_changes_features_and_is_resized(mode: str) -> None:
    net = tiny(cond_channels=2, cond_upsample=mode).eval()
    x = torch.rand(1, 3, 6, 6) * 2 - 1
    low = torch.randn(1, 2, 3, 3)
    out = net(x, low)
    assert out.shape == (1, net.out_channels, 6, 6)
    assert not torch.allclose(out, net(x, low + 1))
    full = torch.nn.functional.interpolate(
        low, size=(6, 6), mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
    )
    torch.testing.assert_close(net(x, full), out)
    # A map changes the features where it changes, not only globally: touch one map cell.
    bumped = low.clone()
    bumped[0, :, 0, 0] += 1.0
    diff = (net(x, bumped) - out).abs().sum(1)[0]  # (6, 6)
    assert diff[0, 0] > 0


@pytest.mark.parametrize(
    ("build_kwargs", "cond", "error"),
    [
        (dict(cond_channels=2), None, ValueError),  # missing
        (dict(num_classes=3), None, ValueError),  # missing
        (dict(num_classes=3, cond_channels=2), torch.tensor([0, 1]), ValueError),  # map missing
        (dict(), torch.tensor([0, 1]), ValueError),  # given when not conditional
        (dict(), torch.randn(2, 2, 3, 3), ValueError),  # given when not conditional
        (dict(cond_channels=2), torch.randn(2, 3, 3, 3), ValueError),  # wrong channels
        (dict(cond_channels=2), torch.randn(2, 2, 3), ValueError),  # wrong ndim
        (dict(cond_channels=2), torch.randn(3, 2, 3, 3), ValueError),  # wrong batch
        (dict(cond_channels=2), {"map": torch.ones(2, 2, 3, 3, dtype=torch.int32)}, TypeError),
        (dict(cond_channels=2), {"maps": torch.randn(2, 2, 3, 3)}, ValueError),  # bad key
        (dict(num_classes=3), torch.tensor([[0], [1]]), ValueError),  # label shape
    ],
)
def test_bad_cond_is_rejected(build_kwargs: dict, cond: object, error: type) -> None:
    net = tiny(**build_kwargs)
    with pytest.raises(error, match="cond"):
        net(torch.zeros(2, 3, 5, 5), cond)


def test_bad_image_is_rejected() -> None:
    net = tiny()
    with pytest.raises(ValueError, match="3 channels"):
        net(torch.zeros(2, 4, 5, 5))
    with pytest.raises(TypeError, match="x"):
        net(torch.zeros(2, 3, 5, 5, dtype=torch.uint8))


# -- learning and sampling through build() --------------------------------------------------


def code_map(n: int, seed: int) -> torch.Tensor:
    """One-hot 2x2 maps of 4 codes, as a VQ-VAE would give: float ``(n, 4, 2, 2)``."""
    codes = torch.randint(0, 4, (n, 2, 2), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(codes, 4).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("head", HEADS)
def test_conditional_model_learns_real_images(head: str) -> None:
    images, labels = load_bundled("cifar10", "train")
    x = images[:16, :, 8:16, 8:16].long()  # 16 real 8x8 crops
    cond = {"label": labels[:16], "map": code_map(16, 0)}
    model = tiny_model(head, num_classes=10, cond_channels=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        start = model.bits_per_dim(x, cond).mean().item()
    for _ in range(60):
        opt.zero_grad()
        model.bits_per_dim(x, cond).mean().backward()
        opt.step()
    with torch.no_grad():
        end = model.bits_per_dim(x, cond).mean().item()
    assert end < 0.8 * start, f"{head}: bits/dim {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("head", HEADS)
def test_conditional_sampling(head: str) -> None:
    model = tiny_model(head, num_classes=10, cond_channels=4)
    cond = {"label": torch.tensor([3, 7]), "map": code_map(2, 1)}
    out = model.sample(2, (4, 4), cond=cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.int64
    assert 0 <= int(out.min()) and int(out.max()) <= model.bins - 1
    again = model.sample(2, (4, 4), cond=cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)

    image = torch.randint(0, model.bins, (2, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2] = True  # completion of the top half
    mask[1, 1, 2] = mask[1, 3, 0] = True  # inpainting of scattered pixels
    filled = model.sample(2, (4, 4), cond=cond, known=(image, mask))
    assert torch.equal(filled.permute(0, 2, 3, 1)[mask], image.permute(0, 2, 3, 1)[mask])
