"""PixelCNN++ backbone: openai/pixel-cnn architecture, causality, receptive field, learning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import discretelik as dl
from discretelik.backbones.pixelcnn_pp import GatedResNet, PixelCNNPP, PixelCNNPPConfig
from discretelik.data import load_bundled
from discretelik.nn.nin import NIN
from discretelik.nn.shifted_conv import DownRightShiftedConv2d, DownShiftedConv2d
from discretelik.nn.weight_norm import apply_weight_norm, data_dependent_init, is_weight_normed
from discretelik.testing import check_causality, receptive_field

OPENAI_PARAMS = 53_659_080  # openai/pixel-cnn, nr_filters=160, nr_resnet=5, 10 mixtures, RGB


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(**kwargs) -> PixelCNNPP:
    torch.manual_seed(0)
    return dl.create_backbone("pixelcnn++", preset="tiny", **kwargs)


def earlier(h: int, w: int, pos: tuple[int, int]) -> torch.Tensor:
    return torch.arange(h * w).view(h, w) < pos[0] * w + pos[1]


# -- registry and config ---------------------------------------------------------------------------


def test_registered_with_alias_presets_and_paper_defaults() -> None:
    assert dl.get_backbone("pixelcnn++") is PixelCNNPP
    assert dl.get_backbone("pixelcnn_pp") is PixelCNNPP
    assert dl.backbone_presets("pixelcnn++") == ["paper", "tiny"]
    assert dl.backbone_config("pixelcnn++") == dl.backbone_config("pixelcnn++", "paper")
    cfg = PixelCNNPPConfig()
    assert (cfg.nr_filters, cfg.nr_resnet, cfg.dropout, cfg.num_classes) == (160, 5, 0.5, None)
    assert PixelCNNPP.size_multiple == 4 and not PixelCNNPP.supports_channel_groups
    net = PixelCNNPP(PixelCNNPPConfig(nr_filters=8, nr_resnet=1), in_channels=1)
    assert (net.in_channels, net.out_channels, net.channel_groups) == (1, 8, 1)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("nr_filters", 0, ValueError),
        ("nr_resnet", 0, ValueError),
        ("nr_resnet", 2.0, TypeError),
        ("dropout", 1.0, ValueError),
        ("dropout", -0.1, ValueError),
        ("num_classes", 0, ValueError),
        ("weight_norm", 1, TypeError),
    ],
)
def test_config_validation(field: str, value: object, error: type) -> None:
    with pytest.raises(error, match=field):
        PixelCNNPPConfig(**{field: value})


# -- architecture ----------------------------------------------------------------------------------


def test_layer_counts_and_shortcut_widths_follow_openai() -> None:
    r, f = 2, 8
    net = PixelCNNPP(nr_filters=f, nr_resnet=r, dropout=0.0)
    assert [len(block) for block in net.up_u] == [r, r, r]
    assert [len(block) for block in net.up_ul] == [r, r, r]
    # Down pass: nr_resnet, then nr_resnet + 1 twice (it consumes the down-sampling outputs).
    assert [len(block) for block in net.down_u] == [r, r + 1, r + 1]
    assert [len(block) for block in net.down_ul] == [r, r + 1, r + 1]
    # Short-cut NINs read concat_elu(aux): up ul <- u (F), down u <- u_list (F), down ul <- 2F.
    assert all(layer.aux is None for block in net.up_u for layer in block)
    assert {layer.aux.conv.in_channels for block in net.up_ul for layer in block} == {2 * f}
    assert {layer.aux.conv.in_channels for block in net.down_u for layer in block} == {2 * f}
    assert {layer.aux.conv.in_channels for block in net.down_ul for layer in block} == {4 * f}
    for block in (*net.up_u, *net.down_u):
        assert all(isinstance(layer.conv1, DownShiftedConv2d) for layer in block)
    for block in (*net.up_ul, *net.down_ul):
        assert all(isinstance(layer.conv1, DownRightShiftedConv2d) for layer in block)
    resnets = [m for m in net.modules() if isinstance(m, GatedResNet)]
    assert len(resnets) == 2 * (3 * r + 3 * r + 2)
    assert all(layer.conv2.conv.out_channels == 2 * f for layer in resnets)
    # First layers see the image plus the all-ones channel.
    assert net.u_init.kernel_size == (2, 3) and net.u_init.conv.in_channels == 4
    assert net.ul_init_above.kernel_size == (1, 3) and net.ul_init_left.kernel_size == (2, 1)
    assert all(m.stride == (2, 2) for m in (*net.downsample_u, *net.downsample_ul))
    assert all(m.stride == (2, 2) for m in (*net.upsample_u, *net.upsample_ul))


def test_every_conv_is_weight_normed_unless_disabled() -> None:
    layers = [m for m in tiny().modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert layers and all(is_weight_normed(m) for m in layers)
    plain = tiny(weight_norm=False)
    assert not any(is_weight_normed(m) for m in plain.modules())
    # Weight norm adds exactly one g per output channel of every layer.
    convs = (nn.Conv2d, nn.ConvTranspose2d)
    extra = sum(m.out_channels for m in plain.modules() if isinstance(m, convs))
    assert n_params(tiny()) == n_params(plain) + extra


def test_paper_parameter_count_matches_openai() -> None:
    net = dl.create_backbone("pixelcnn++", preset="paper")
    backbone = n_params(net)
    assert backbone == 53_642_880
    # openai's last layer is a weight-normed nin 160 -> 10 * 10 mixtures (w, b and g).
    assert backbone + n_params(NIN(160, 100)) == OPENAI_PARAMS
    del net
    if "dlm" not in dl.list_heads():
        pytest.skip("the dlm head is not registered yet")
    model = dl.build("pixelcnn++", "dlm", head_kwargs={"mixtures": 10})
    assert model.head.param_channels == 100
    total = n_params(model)
    # The head's projection is a plain conv: 100 g's fewer than openai (0.0002 %).
    assert total == OPENAI_PARAMS - 100
    assert abs(total - OPENAI_PARAMS) / OPENAI_PARAMS < 0.005
    apply_weight_norm(model.head.proj)  # openai's weight-normed nin: exactly the same count
    assert n_params(model) == OPENAI_PARAMS


# -- forward, inputs and conditioning ------------------------------------------------------------


def test_forward_shape_dtype_and_elu_range() -> None:
    net = tiny()
    out = net(torch.rand(2, 3, 8, 12) * 2 - 1)
    assert out.shape == (2, 8, 8, 12) and out.dtype == torch.float32
    assert bool((out >= -1).all()) and bool(torch.isfinite(out).all())  # elu(ul)
    out64 = net.double()(torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1)
    assert out64.shape == (1, 8, 4, 4) and out64.dtype == torch.float64


def test_bad_inputs_are_rejected() -> None:
    net = tiny()
    with pytest.raises(ValueError, match=r"x .*multiples of 4.*6x8"):
        net(torch.zeros(1, 3, 6, 8))
    with pytest.raises(ValueError, match="x must have 3 channels"):
        net(torch.zeros(1, 1, 8, 8))
    with pytest.raises(TypeError, match="x"):
        net(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="x"):
        net(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="cond"):
        net(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))  # unconditional net given labels


def test_class_conditioning_changes_output_and_validates_labels() -> None:
    net = tiny(num_classes=10).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    a = net(x, torch.tensor([3, 4]))
    b = net(x, torch.tensor([3, 5]))
    assert torch.equal(a[0], b[0])  # an image's label affects only that image
    assert not torch.allclose(a[1], b[1])
    assert n_params(net) > n_params(tiny())
    for bad, error in (
        (None, ValueError),
        (torch.tensor([0, 10]), ValueError),
        (torch.tensor([-1, 0]), ValueError),
        (torch.tensor([0, 1, 2]), ValueError),
        (torch.tensor([0.0, 1.0]), ValueError),  # a float tensor is read as a spatial map
        ("cat", TypeError),
    ):
        with pytest.raises(error, match="cond"):
            net(x, bad)


def test_gated_resnet_and_constructor_argument_errors() -> None:
    layer = GatedResNet(4, DownShiftedConv2d, aux_channels=4, num_classes=3)
    x = torch.randn(2, 4, 4, 4)
    assert layer(x, x, torch.tensor([0, 2])).shape == x.shape
    with pytest.raises(ValueError, match="aux"):
        layer(x, label=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="label"):
        layer(x, x)
    with pytest.raises(ValueError, match="label"):
        GatedResNet(4, DownShiftedConv2d)(x, label=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="config"):
        PixelCNNPP({"nr_filters": 8})  # type: ignore[arg-type]


def test_dropout_is_elementwise_and_off_in_eval() -> None:
    torch.manual_seed(0)
    net = tiny(dropout=0.5).train()
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert drops and not any(isinstance(m, nn.Dropout2d) for m in net.modules())
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((i[0], o))) for m in drops]
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    net(x)
    for h in hooks:
        h.remove()
    assert len(seen) == len(drops)
    full = [(i, o) for i, o in seen if i.shape[-2:] == (16, 16)]  # the 256-element maps
    assert full
    for inp, out in full:
        dropped = ((out == 0) & (inp != 0)).flatten(2).float()  # (B, 2F, H*W)
        frac = dropped.mean(-1)
        # Channel-wise dropout would give 0 or 1 per (image, channel) map; element-wise dropout
        # drops about half the elements of every map independently.
        assert bool(((frac > 0.2) & (frac < 0.8)).all())
        assert 0.45 < float(dropped.mean()) < 0.55
        kept = out != 0
        torch.testing.assert_close(out[kept], 2 * inp[kept])  # inverted dropout, scale 1/(1-p)
    net.eval()
    torch.testing.assert_close(net(x), net(x))


# -- causality and receptive field ---------------------------------------------------------------


@settings(max_examples=6)
@given(
    h=st.sampled_from([4, 8]),
    w=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_backbone_is_causal(h: int, w: int, seed: int, data: st.DataObject) -> None:
    net = tiny(num_classes=3) if seed % 2 else tiny()
    cond = torch.tensor([seed % 3]) if seed % 2 else None
    positions = data.draw(
        st.lists(st.tuples(st.integers(0, h - 1), st.integers(0, w - 1)), min_size=1, max_size=8)
    )
    check_causality(net, (3, h, w), positions=positions, cond=cond, seed=seed)


def test_backbone_is_causal_at_every_pixel_8x8() -> None:
    check_causality(tiny(), (3, 8, 8))


@pytest.mark.parametrize("head", dl.list_heads())
def test_model_is_causal_for_every_head(head: str) -> None:
    torch.manual_seed(0)
    model = dl.build("pixelcnn++", head, preset="tiny")

    @settings(max_examples=3)
    @given(seed=st.integers(0, 2**16), data=st.data())
    def check(seed: int, data: st.DataObject) -> None:
        pixel = st.tuples(st.integers(0, 7), st.integers(0, 7))
        positions = data.draw(st.lists(pixel, min_size=1, max_size=10))
        check_causality(model, (3, 8, 8), positions=positions, seed=seed)

    check()


@pytest.mark.parametrize("pos", [(16, 16), (20, 3), (31, 31)])
def test_tiny_middle_pixels_see_every_earlier_pixel_at_32x32(pos: tuple[int, int]) -> None:
    rf = receptive_field(tiny(), (3, 32, 32), pos)
    want = earlier(32, 32, pos)
    if pos == (31, 31):
        # nr_resnet=1 misses the start of the last rows (see the next test); only assert
        # causality there.
        assert not bool((rf & ~want).any())
    else:
        assert torch.equal(rf, want)


def test_current_row_reach_is_4_nr_resnet_plus_2_as_in_openai() -> None:
    # At full resolution, information from the current row enters only through the ul stream's
    # 2x2 convolutions: the first layer sees 1 pixel left, the first up block adds 2 nr_resnet,
    # and the last down block's first layer reads that through its short-cut nin, adding 1 + 2
    # nr_resnet. For the paper's nr_resnet=5 the last pixel of a 32-wide row cannot see the
    # first 31 - 22 = 9 pixels of its row; everything else before it is seen.
    torch.manual_seed(0)
    net = PixelCNNPP(nr_filters=2, nr_resnet=5, dropout=0.0)
    rf = receptive_field(net, (3, 32, 32), (31, 31))
    want = earlier(32, 32, (31, 31))
    want[31, :9] = False
    assert torch.equal(rf, want)


@pytest.mark.parametrize("pos", [(31, 31), (1, 0), (1, 31), (16, 16)])
def test_nr_resnet_8_sees_every_earlier_pixel_at_32x32(pos: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = PixelCNNPP(nr_filters=2, nr_resnet=8, dropout=0.0)  # 4 * 8 + 2 >= 31
    assert torch.equal(receptive_field(net, (3, 32, 32), pos), earlier(32, 32, pos))


# -- initialisation and learning -------------------------------------------------------------------


def _some_head() -> str:
    heads = dl.list_heads()
    if not heads:
        pytest.skip("no head registered yet")
    return "dlm" if "dlm" in heads else heads[0]


def test_data_dependent_init_on_the_composed_model() -> None:
    torch.manual_seed(0)
    model = dl.build("pixelcnn++", _some_head(), preset="tiny")
    images, _ = load_bundled("cifar10", "train")
    x = images[:16, :, :8, :8].long()
    n = data_dependent_init(model, x)
    assert n == sum(is_weight_normed(m) for m in model.modules())
    assert bool(torch.isfinite(model.log_prob(x)).all())


def test_learns_cifar10_at_32x32_with_dlm() -> None:
    if "dlm" not in dl.list_heads():
        pytest.skip("the dlm head is not registered yet")
    torch.manual_seed(0)
    images, _ = load_bundled("cifar10", "train")
    x = images[:16].long()  # (16, 3, 32, 32)
    model = dl.build("pixelcnn++", "dlm", preset="tiny")
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.eval()
    with torch.no_grad():
        start = float(model.bits_per_dim(x).mean())
    model.train()
    for _ in range(24):  # about 0.3 s a step on one core; bits/dim 9.0 -> 6.9 here
        opt.zero_grad()
        model.bits_per_dim(x).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = float(model.bits_per_dim(x).mean())
    assert end < 0.85 * start, f"bits/dim {start:.3f} -> {end:.3f}"
