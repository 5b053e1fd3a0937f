"""PixelRNN backbones: causality, receptive fields, sampling, learning, loop lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discretelik as dl
from discretelik.backbones.pixelrnn import DiagonalBiLSTMConfig, RowLSTMBackbone, RowLSTMConfig
from discretelik.data import load_bundled
from discretelik.nn.recurrent import DiagonalBiLSTM, RowLSTM, lstm_update, skew, unskew
from discretelik.testing import check_causality, dependency_map, receptive_field

NAMES = ["row_lstm", "diagonal_bilstm"]


def tiny(name: str, **kwargs) -> dl.Backbone:
    torch.manual_seed(0)
    return dl.create_backbone(name, preset="tiny", **kwargs)


# -- expected receptive fields, from the kernels alone -------------------------------------


def input_conv_field(targets: torch.Tensor, groups: int) -> torch.Tensor:
    """Pixels the 7x7 mask-A input convolution reads at any of ``targets`` (bool (H, W))."""
    height, width = targets.shape
    out = torch.zeros_like(targets)
    for i, j in targets.nonzero().tolist():
        out[max(0, i - 3) : i, max(0, j - 3) : j + 4] = True  # three rows above, 7 wide
        out[i, max(0, j - 3) : j] = True  # three pixels to the left
        # With colour groups, G and B features read R (and G) of their own pixel.
        out[i, j] |= groups > 1
    return out


def row_lstm_layer_field(targets: torch.Tensor) -> torch.Tensor:
    """Layer inputs a residual Row LSTM layer (k = 3) reads at ``targets``.

    The 1x3 mask-B input-to-state kernel reads the pixel and its left neighbour; each step of
    the k = 3 state-to-state recursion reaches one row up and one pixel further on each side,
    so ``k`` rows up the layer sees columns ``j - k - 1 .. j + k``: the paper's triangle.
    """
    width = targets.shape[1]
    out = targets.clone()  # the residual connection
    for i, j in targets.nonzero().tolist():
        out[i, max(0, j - 1) : j + 1] = True
        for k in range(1, i + 1):
            out[i - k, max(0, j - k - 1) : min(width, j + k + 1)] = True
    return out


def diagonal_layer_field(targets: torch.Tensor) -> torch.Tensor:
    """Layer inputs a residual Diagonal BiLSTM layer reads at ``targets``.

    Left-to-right: the quadrant above-left, pixel included. Right-to-left, shifted down one
    row: the quadrant above-right of the pixel above.
    """
    out = targets.clone()
    for i, j in targets.nonzero().tolist():
        out[: i + 1, : j + 1] = True
        out[:i, j:] = True
    return out


def expected_field(name: str, shape: tuple[int, int], position, n_layers: int, groups: int):
    layer = row_lstm_layer_field if name == "row_lstm" else diagonal_layer_field
    field = torch.zeros(shape, dtype=torch.bool)
    field[position] = True  # the 1x1 output convolutions read only the pixel itself
    for _ in range(n_layers):
        field = layer(field)
    return input_conv_field(field, groups)


def earlier(shape: tuple[int, int], position: tuple[int, int]) -> torch.Tensor:
    height, width = shape
    raster = torch.arange(height * width).view(height, width)
    return raster < position[0] * width + position[1]


# -- building blocks ------------------------------------------------------------------------


def test_skew_and_unskew() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)
    expected = torch.tensor([[0.0, 1, 2, 0], [0, 3, 4, 5]])
    torch.testing.assert_close(skew(x)[0, 0], expected)
    y = torch.randn(2, 3, 4, 5)
    assert skew(y).shape == (2, 3, 4, 8)
    torch.testing.assert_close(unskew(skew(y), 5), y)


def _reference_diagonal(layer: DiagonalBiLSTM, x: torch.Tensor) -> torch.Tensor:
    """The Diagonal BiLSTM pixel by pixel in image coordinates, no skewing."""
    b, _, height, width = x.shape
    h, groups = layer.hidden_channels, layer.groups
    weight = layer.state_to_state  # (2, 4h, 2h): [above | left] per direction
    outs = []
    for d in range(2):
        xd = x if d == 0 else x.flip(-1)
        pre_is = layer.input_to_state[d](xd)
        w_above, w_left = weight[d, :, :h], weight[d, :, h:]  # (4h, h) each
        hid = x.new_zeros(b, h, height, width)
        cell = x.new_zeros(b, groups, h // groups, height, width)
        for i in range(height):
            for j in range(width):
                above = hid[:, :, i - 1, j] if i > 0 else x.new_zeros(b, h)
                left = hid[:, :, i, j - 1] if j > 0 else x.new_zeros(b, h)
                c_left = cell[..., i, j - 1] if j > 0 else x.new_zeros(b, groups, h // groups)
                pre = pre_is[:, :, i, j] + above @ w_above.T + left @ w_left.T
                new_h, new_c = lstm_update(pre.view(b, groups, 4, -1, 1), c_left[..., None])
                hid[:, :, i, j] = new_h.reshape(b, h)
                cell[..., i, j] = new_c[..., 0]
        outs.append(hid if d == 0 else hid.flip(-1))
    shifted = torch.zeros_like(outs[1])
    shifted[:, :, 1:] = outs[1][:, :, :-1]
    return outs[0] + shifted


@pytest.mark.parametrize("groups", [1, 3])
def test_diagonal_bilstm_matches_pixel_by_pixel_reference(groups: int) -> None:
    torch.manual_seed(0)
    layer = DiagonalBiLSTM(6, 6, groups=groups).double()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _reference_diagonal(layer, x))


def test_recurrences_loop_over_rows_or_diagonals_only(monkeypatch) -> None:
    calls = {"row": 0, "diag": 0}
    row_step, diag_step = RowLSTM.step, DiagonalBiLSTM.step

    def count(key, step):
        def wrapped(self, *args):
            calls[key] += 1
            return step(self, *args)

        return wrapped

    monkeypatch.setattr(RowLSTM, "step", count("row", row_step))
    monkeypatch.setattr(DiagonalBiLSTM, "step", count("diag", diag_step))
    x = torch.zeros(3, 3, 5, 7)
    tiny("row_lstm", n_layers=2)(x)
    tiny("diagonal_bilstm", n_layers=2)(x)
    assert calls == {"row": 2 * 5, "diag": 2 * (5 + 7 - 1)}


# -- causality ------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_backbone_causality(name: str, groups: int) -> None:
    net = tiny(name, n_layers=2, channel_groups=groups)

    @settings(max_examples=6)
    @given(
        h=st.integers(3, 8),
        w=st.integers(3, 8),
        data=st.data(),
        seed=st.integers(0, 2**16),
    )
    def check(h: int, w: int, data, seed: int) -> None:
        pixels = st.tuples(st.integers(0, h - 1), st.integers(0, w - 1))
        positions = data.draw(st.lists(pixels, min_size=1, max_size=12, unique=True))
        check_causality(net, (3, h, w), positions=positions, seed=seed)

    check()


@pytest.mark.parametrize("head", dl.list_heads())
@pytest.mark.parametrize("name", NAMES)
def test_model_causality_for_every_head(name: str, head: str) -> None:
    torch.manual_seed(0)
    model = dl.build(name, head, preset="tiny", n_layers=2)
    check_causality(model, (3, 5, 6))
    grey = dl.build(name, head, preset="tiny", channels=1)
    check_causality(grey, (1, 4, 7))


@pytest.mark.parametrize("name", NAMES)
def test_colour_groups_see_earlier_colours_of_the_same_pixel(name: str) -> None:
    """Ordering is not over-masked: G reads R, B reads R and G of its own pixel."""
    net = tiny(name, channel_groups=3)
    block = net.out_channels // 3
    for c in range(3):
        changed = dependency_map(net, (3, 5, 5), (2, 2), channel=c)[:, 2, 2]
        for o in range(3):
            assert bool(changed[o * block : (o + 1) * block].any()) == (o > c), (c, o)


def test_build_orders_channels_only_for_softmax_on_colour_images() -> None:
    for name in NAMES:
        if "softmax" in dl.list_heads():
            assert dl.build(name, "softmax", preset="tiny").backbone.channel_groups == 3
            grey = dl.build(name, "softmax", preset="tiny", channels=1)
            assert grey.backbone.channel_groups == 1
        if "dlm" in dl.list_heads():
            assert dl.build(name, "dlm", preset="tiny").backbone.channel_groups == 1


# -- receptive fields -----------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3])
def test_diagonal_bilstm_sees_every_earlier_pixel(groups: int) -> None:
    shape = (6, 6)
    net = tiny("diagonal_bilstm", n_layers=1, channel_groups=groups)
    for pos in [(0, 3), (2, 2), (3, 5), (4, 0), (5, 4)]:
        full = earlier(shape, pos)
        if groups > 1:
            full[pos] = True  # the pixel's own earlier colours
        elif pos[1] < shape[1] - 4 and pos[0] > 0:
            # The last pixel of the row above reaches (i, j) only through the 7x7 mask-A input
            # convolution (every later layer at an earlier position must not see its own
            # pixel), so only for j >= W - 4 -- as in the paper's architecture.
            full[pos[0] - 1, -1] = False
        got = receptive_field(net, (3, *shape), pos)
        assert torch.equal(got, full), pos
        assert torch.equal(got, expected_field("diagonal_bilstm", shape, pos, 1, groups))


@pytest.mark.parametrize(("n_layers", "groups"), [(1, 1), (2, 1), (2, 3)])
def test_row_lstm_has_the_triangular_field(n_layers: int, groups: int) -> None:
    shape = (7, 14)
    net = tiny("row_lstm", n_layers=n_layers, channel_groups=groups)
    for pos in [(0, 5), (3, 0), (4, 7), (6, 13), (6, 6)]:
        got = receptive_field(net, (3, *shape), pos)
        assert torch.equal(got, expected_field("row_lstm", shape, pos, n_layers, groups)), pos
    # Not the full context: pixels far along the current row and far right two rows up are
    # earlier in raster order but unseen.
    got = receptive_field(net, (3, *shape), (6, 13))
    assert not bool(got[6, 0]) and not bool(got[4, 0])
    got = receptive_field(net, (3, *shape), (3, 0))
    assert not bool(got[2, 13]) and bool(earlier(shape, (3, 0))[2, 13])


# -- sampling, learning, configuration ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sampling_keeps_known_pixels(name: str) -> None:
    head = "softmax" if "softmax" in dl.list_heads() else dl.list_heads()[0]
    torch.manual_seed(0)
    model = dl.build(name, head, preset="tiny", bins=16)
    image = torch.randint(0, 16, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 2, 3] = True
    out = model.sample(2, (4, 5), known=(image, mask), generator=torch.Generator().manual_seed(2))
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.int64
    assert 0 <= int(out.min()) and int(out.max()) <= 15
    assert torch.equal(out.permute(0, 2, 3, 1)[mask], image.permute(0, 2, 3, 1)[mask])
    assert not torch.equal(out.permute(0, 2, 3, 1)[~mask], image.permute(0, 2, 3, 1)[~mask])


@pytest.mark.parametrize("name", NAMES)
def test_learns_mnist(name: str) -> None:
    head = "softmax" if "softmax" in dl.list_heads() else dl.list_heads()[0]
    images, _ = load_bundled("mnist", "train")
    x = images[:16, :, 8:20, 8:20].long()  # the centre 12x12, where the digits are
    torch.manual_seed(0)
    model = dl.build(name, head, channels=1, preset="tiny")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        start = model.bits_per_dim(x).mean().item()
    for _ in range(30):
        opt.zero_grad()
        model.bits_per_dim(x).mean().backward()
        opt.step()
    with torch.no_grad():
        end = model.bits_per_dim(x).mean().item()
    assert end < 0.6 * start, f"bits/dim {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_presets_and_bad_configs(name: str) -> None:
    assert {"paper", "tiny"} <= set(dl.backbone_presets(name))
    paper = dl.backbone_config(name, "paper")
    assert (paper.n_layers, paper.hidden_channels) == (12, 129)
    assert paper.hidden_channels % 3 == 0 and paper.out_channels % 3 == 0
    with pytest.raises(ValueError, match="channel_groups"):
        dl.create_backbone(name, preset="tiny", channel_groups=2)
    with pytest.raises(ValueError, match="hidden_channels"):
        dl.create_backbone(name, preset="tiny", hidden_channels=8, channel_groups=3)
    with pytest.raises(ValueError, match="out_channels"):
        dl.create_backbone(name, preset="tiny", out_channels=8, channel_groups=3)
    with pytest.raises(TypeError, match="n_layers"):
        dl.create_backbone(name, preset="tiny", n_layers=1.5)


def test_configs_are_the_registered_ones() -> None:
    assert isinstance(dl.backbone_config("row_lstm", "tiny"), RowLSTMConfig)
    assert type(dl.backbone_config("diagonal_bilstm", "tiny")) is DiagonalBiLSTMConfig
    assert isinstance(dl.create_backbone("row_lstm", preset="tiny"), RowLSTMBackbone)


@pytest.mark.parametrize("name", NAMES)
def test_class_labels_shift_the_gates(name: str) -> None:
    net = tiny(name, num_classes=4)
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    labels = torch.tensor([0, 3])
    assert not torch.allclose(net(x, labels), net(x, torch.tensor([1, 2])))
    # Only the labelled image's own features move.
    same = net(x, torch.tensor([0, 1]))
    torch.testing.assert_close(same[0], net(x, labels)[0])
    with pytest.raises(ValueError, match="cond"):
        net(x)
    check_causality(net, (3, 4, 5), cond=torch.tensor([2]))
