"""The "pixelcnn" backbone: config, causality (whole pixels and R -> G -> B groups), the blind
spot, conditioning, and learning / sampling through ``build`` with every registered head.

``test_combinations.py`` already trains and samples every backbone x head unconditionally; the
learning and sampling tests here use the class-conditional model, so the conditioning path is
trained and sampled too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discretelik as dl
from discretelik.backbones.pixelcnn import PixelCNN
from discretelik.data import load_bundled
from discretelik.testing import check_causality, dependency_map, receptive_field

NAME = "pixelcnn"
HEADS = dl.list_heads()


def tiny(**kwargs) -> PixelCNN:
    torch.manual_seed(0)
    return dl.create_backbone(NAME, preset="tiny", **kwargs)


def tiny_model(head: str, **kwargs) -> dl.AutoregressiveModel:
    torch.manual_seed(0)
    return dl.build(NAME, head, preset="tiny", **kwargs)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- config and presets ---------------------------------------------------------------------


def test_presets() -> None:
    assert dl.backbone_presets(NAME) == ["paper", "tiny"]
    assert isinstance(tiny(), PixelCNN) and n_params(tiny()) < 5_000
    paper = dl.backbone_config(NAME, "paper")
    assert (paper.n_layers, paper.hidden_channels, paper.first_kernel_size, paper.kernel_size) == (
        15,
        129,
        7,
        3,
    )
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = dl.create_backbone(NAME, preset="paper", channel_groups=3)
    assert n_params(net) == 3_556_653


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        (dict(channel_groups=3, hidden_channels=4), ValueError, "hidden_channels"),
        (dict(channel_groups=3, out_channels=16), ValueError, "out_channels"),
        (dict(channel_groups=2), ValueError, "channel_groups"),
        (dict(first_kernel_size=6), ValueError, "first_kernel_size"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(n_layers=-1), ValueError, "n_layers"),
        (dict(in_channels=3.0), TypeError, "in_channels"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(cond_upsample="bicubic"), ValueError, "cond_upsample"),
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
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_backbone_is_causal(
    h: int, w: int, channels: int, grouped: bool, seed: int, data: st.DataObject
) -> None:
    net = tiny(in_channels=channels, channel_groups=channels if grouped else 1)
    check_causality(net, (channels, h, w), data.draw(positions(h, w)), seed=seed)


@pytest.mark.parametrize("groups", [1, 3])
def test_conditional_backbone_is_causal(groups: int) -> None:
    net = tiny(channel_groups=groups, num_classes=4, cond_channels=2)
    cond = {"label": torch.tensor([3]), "map": torch.randn(1, 2, 2, 3)}
    check_causality(net, (3, 5, 6), cond=cond)


@pytest.mark.parametrize("head", HEADS)
def test_model_is_causal_with_every_head(head: str) -> None:
    model = tiny_model(head)

    @settings(max_examples=8)
    @given(h=st.integers(3, 9), w=st.integers(3, 9), seed=st.integers(0, 2**16), data=st.data())
    def check(h: int, w: int, seed: int, data: st.DataObject) -> None:
        check_causality(model, (3, h, w), data.draw(positions(h, w)), seed=seed)

    check()


@pytest.mark.parametrize("head", HEADS)
def test_channel_groups_follow_the_head(head: str) -> None:
    model = tiny_model(head)
    ordered = getattr(type(model.head), "supports_channel_groups", False)
    assert model.backbone.channel_groups == (3 if ordered else 1)


def test_grouped_features_see_earlier_channels_of_the_same_pixel() -> None:
    net = tiny(channel_groups=3)
    block = net.out_channels // 3
    for c in range(3):
        changed = dependency_map(net, (3, 5, 5), (2, 2), channel=c)[:, 2, 2]  # (F,)
        seen = changed.view(3, block).any(dim=1)  # which output blocks react
        # Block o reacts to channel c exactly when c < o: R -> G -> B inside the pixel.
        assert seen.tolist() == [c < o for o in range(3)]


def test_whole_pixel_features_see_none_of_the_current_pixel() -> None:
    changed = dependency_map(tiny(channel_groups=1), (3, 5, 5), (2, 2))
    assert not changed[:, 2, 2].any()
    assert changed[:, 2, 3].any()  # but the next pixel does see it


# -- receptive field: the blind spot --------------------------------------------------------


def pixelcnn_field(size: int, pos: tuple[int, int], n_layers: int, first: int = 7) -> torch.Tensor:
    """The field a masked 7x7 (A) + n_layers x 3x3 (B) stack reaches, blind spot included.

    Row ``i - d`` (d >= 1) reaches right only to ``j + 3 + min(n_layers, d - 1)``: each 3x3
    layer can step one row up and one column right, never right within the same row.
    """
    i, j = pos
    r = first // 2
    field = torch.zeros(size, size, dtype=torch.bool)
    for a in range(size):
        for b in range(size):
            d = i - a
            left_ok = b >= j - r - n_layers
            if d == 0:
                field[a, b] = left_ok and b < j
            elif 1 <= d <= r + n_layers:
                field[a, b] = left_ok and b <= j + r + min(n_layers, d - 1)
    return field


@pytest.mark.parametrize("pos", [(5, 4), (7, 2), (3, 3), (10, 10)])
def test_receptive_field_has_the_blind_spot(pos: tuple[int, int]) -> None:
    n_layers = 3
    net = tiny(n_layers=n_layers)
    field = receptive_field(net, (3, 11, 11), pos)
    assert torch.equal(field, pixelcnn_field(11, pos, n_layers))


def test_blind_spot_hides_a_near_pixel_that_a_farther_one_reaches() -> None:
    # The textbook picture: one row up and four columns right is unseen, although the pixel
    # one row further up in the same column is seen (the Gated PixelCNN fixes this).
    field = receptive_field(tiny(n_layers=3), (3, 9, 9), (5, 4))
    assert not field[4, 8] and field[3, 8]
    assert field[4, 0]  # four columns to the left is seen


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
    # A map already at H x W is used as is; resizing the low one by hand gives the same.
    full = torch.nn.functional.interpolate(
        low, size=(6, 6), mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
    )
    torch.testing.assert_close(net(x, full), out)
    both = tiny(num_classes=3, cond_channels=2).eval()
    assert both(x, {"label": torch.tensor([2]), "map": low}).shape == out.shape


@pytest.mark.parametrize(
    ("build_kwargs", "cond", "error"),
    [
        (dict(cond_channels=2), None, ValueError),  # missing
        (dict(num_classes=3), None, ValueError),  # missing
        (dict(), torch.tensor([0, 1]), ValueError),  # given when not conditional
        (dict(), torch.randn(2, 2, 3, 3), ValueError),  # given when not conditional
        (dict(cond_channels=2), torch.randn(2, 3, 3, 3), ValueError),  # wrong channels
        (dict(cond_channels=2), torch.randn(2, 2, 3), ValueError),  # wrong ndim
        (dict(cond_channels=2), torch.randn(1, 2, 3, 3), ValueError),  # wrong batch
        (dict(cond_channels=2), {"map": torch.ones(2, 2, 3, 3, dtype=torch.long)}, TypeError),
        (dict(num_classes=3), torch.tensor([0, 3]), ValueError),  # label out of range
        (dict(num_classes=3), {"label": torch.tensor([0.0, 1.0])}, TypeError),
        (dict(num_classes=3), [0, 1], TypeError),  # not a tensor
    ],
)
def test_bad_cond_is_rejected(build_kwargs: dict, cond: object, error: type) -> None:
    net = tiny(**build_kwargs)
    with pytest.raises(error, match="cond"):
        net(torch.zeros(2, 3, 5, 5), cond)


def test_bad_image_is_rejected() -> None:
    net = tiny()
    with pytest.raises(ValueError, match="3 channels"):
        net(torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="dimensions"):
        net(torch.zeros(3, 5, 5))
    with pytest.raises(TypeError, match="x"):
        net(torch.zeros(2, 3, 5, 5, dtype=torch.long))


# -- learning and sampling through build() --------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_class_conditional_model_learns_real_images(head: str) -> None:
    images, labels = load_bundled("cifar10", "train")
    x, y = images[:16, :, 8:16, 8:16].long(), labels[:16]  # 16 real 8x8 crops
    model = tiny_model(head, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        start = model.bits_per_dim(x, y).mean().item()
    for _ in range(60):
        opt.zero_grad()
        model.bits_per_dim(x, y).mean().backward()
        opt.step()
    with torch.no_grad():
        end = model.bits_per_dim(x, y).mean().item()
    assert end < 0.8 * start, f"{head}: bits/dim {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("head", HEADS)
def test_conditional_sampling(head: str) -> None:
    model = tiny_model(head, num_classes=10)
    labels = torch.tensor([3, 7])
    out = model.sample(2, (4, 4), cond=labels, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.int64
    assert 0 <= int(out.min()) and int(out.max()) <= model.bins - 1
    again = model.sample(2, (4, 4), cond=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)

    image = torch.randint(0, model.bins, (2, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0] = True  # completion of the first row
    mask[1, 2, 1] = mask[1, 3, 3] = True  # inpainting of scattered pixels
    filled = model.sample(2, (4, 4), cond=labels, known=(image, mask))
    assert torch.equal(filled.permute(0, 2, 3, 1)[mask], image.permute(0, 2, 3, 1)[mask])
