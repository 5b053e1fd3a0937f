"""PixelCNN++ building blocks: shifted (transposed) convolutions, concat_elu, NIN, weight norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from discretelik.nn.activations import concat_elu
from discretelik.nn.nin import NIN
from discretelik.nn.shifted_conv import (
    DownRightShiftedConv2d,
    DownRightShiftedConvTranspose2d,
    DownShiftedConv2d,
    DownShiftedConvTranspose2d,
    down_shift,
    right_shift,
)
from discretelik.nn.weight_norm import apply_weight_norm, data_dependent_init, is_weight_normed


def dependency(layer: nn.Module, shape: tuple[int, int], out_pos: tuple[int, int]) -> torch.Tensor:
    """bool (H, W): input pixels with a non-zero gradient for the output at ``out_pos``."""
    layer = layer.double()
    x = torch.randn(1, layer.conv.in_channels, *shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)[0, :, out_pos[0], out_pos[1]]
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    return grad[0].abs().sum(0) > 0


def expected(shape: tuple[int, int], rows: range, cols: range) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for i in rows:
        for j in cols:
            if 0 <= i < shape[0] and 0 <= j < shape[1]:
                mask[i, j] = True
    return mask


# -- shifts --------------------------------------------------------------------------------------


def test_down_and_right_shift_move_by_one_and_zero_fill() -> None:
    x = torch.arange(1.0, 13.0).view(1, 1, 3, 4)
    d = down_shift(x)
    assert torch.equal(d[0, 0, 0], torch.zeros(4)) and torch.equal(d[0, 0, 1:], x[0, 0, :-1])
    r = right_shift(x)
    assert torch.equal(r[0, 0, :, 0], torch.zeros(3))
    assert torch.equal(r[0, 0, :, 1:], x[0, 0, :, :-1])
    assert down_shift(torch.ones(2, 3, 1, 5)).abs().sum() == 0  # one row: all padding


# -- shifted convolutions: exact dependency sets ---------------------------------------------------


@settings(max_examples=15)
@given(
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    kh=st.integers(1, 3),
    half=st.integers(0, 1),
    stride=st.integers(1, 2),
    data=st.data(),
)
def test_down_shifted_conv_sees_its_row_and_above_centred(h, w, kh, half, stride, data) -> None:
    kw = 2 * half + 1
    layer = DownShiftedConv2d(2, 3, (kh, kw), stride=stride, weight_norm=bool(stride - 1))
    oh, ow = -(-h // stride), -(-w // stride)
    i, j = data.draw(st.integers(0, oh - 1)), data.draw(st.integers(0, ow - 1))
    dep = dependency(layer, (h, w), (i, j))
    rows = range(stride * i - kh + 1, stride * i + 1)
    cols = range(stride * j - half, stride * j + half + 1)
    assert torch.equal(dep, expected((h, w), rows, cols))


@settings(max_examples=15)
@given(
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.integers(1, 2),
    data=st.data(),
)
def test_down_right_shifted_conv_sees_above_and_left(h, w, kh, kw, stride, data) -> None:
    layer = DownRightShiftedConv2d(2, 3, (kh, kw), stride=stride)
    oh, ow = -(-h // stride), -(-w // stride)
    i, j = data.draw(st.integers(0, oh - 1)), data.draw(st.integers(0, ow - 1))
    dep = dependency(layer, (h, w), (i, j))
    rows = range(stride * i - kh + 1, stride * i + 1)
    cols = range(stride * j - kw + 1, stride * j + 1)
    assert torch.equal(dep, expected((h, w), rows, cols))


@settings(max_examples=15)
@given(h=st.integers(1, 5), w=st.integers(1, 5), stride=st.integers(1, 2), data=st.data())
def test_transposed_convs_write_down_and_right_of_their_input(h, w, stride, data) -> None:
    # Output (p, q) depends on input (i, j) iff input (i, j) wrote it before the crop: rows
    # s i .. s i + kh - 1, columns s j - 1 .. s j + 1 (2x3, centred) or s j .. s j + 1 (2x2).
    p = data.draw(st.integers(0, stride * h - 1))
    q = data.draw(st.integers(0, stride * w - 1))
    for cls, (kh, kw), left in (
        (DownShiftedConvTranspose2d, (2, 3), 1),
        (DownRightShiftedConvTranspose2d, (2, 2), 0),
    ):
        layer = cls(2, 3, (kh, kw), stride=stride)
        dep = dependency(layer, (h, w), (p, q))
        want = torch.zeros(h, w, dtype=torch.bool)
        for i in range(h):
            for j in range(w):
                dr, dc = p - stride * i, q - stride * j + left
                want[i, j] = 0 <= dr < kh and 0 <= dc < kw
        assert torch.equal(dep, want), (cls.__name__, p, q)


def test_stride_two_pair_keeps_rows_causal() -> None:
    # Low-resolution row i summarises high-resolution rows <= 2i and feeds rows 2i and 2i + 1:
    # after a down_shift, the round trip never moves information upwards.
    down = DownShiftedConv2d(1, 1, stride=2).double()
    up = DownShiftedConvTranspose2d(1, 1, stride=2).double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = up(down(down_shift(x)))
    for p in range(8):
        (grad,) = torch.autograd.grad(out[0, 0, p].sum(), x, retain_graph=True)
        assert grad[0, 0, p:].abs().sum() == 0, p


@pytest.mark.parametrize("size", [(1, 1), (4, 4), (5, 8), (16, 12)])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_output_sizes(size: tuple[int, int], stride: int) -> None:
    x = torch.randn(2, 4, *size)
    h, w = size
    for cls in (DownShiftedConv2d, DownRightShiftedConv2d):
        assert cls(4, 6, stride=stride)(x).shape == (2, 6, -(-h // stride), -(-w // stride))
    for cls in (DownShiftedConvTranspose2d, DownRightShiftedConvTranspose2d):
        assert cls(4, 6, stride=stride)(x).shape == (2, 6, stride * h, stride * w)


def test_bad_kernel_arguments() -> None:
    with pytest.raises(ValueError, match="odd"):
        DownShiftedConv2d(2, 2, (2, 2))
    with pytest.raises(ValueError, match="odd"):
        DownShiftedConvTranspose2d(2, 2, (2, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        DownRightShiftedConv2d(2, 2, (0, 2))
    with pytest.raises(ValueError, match="stride"):
        DownRightShiftedConv2d(2, 2, stride=(1, 2, 3))


# -- concat_elu and NIN --------------------------------------------------------------------------


def test_concat_elu_shape_and_values() -> None:
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    out = concat_elu(x, dim=1)
    assert out.shape == (1, 10)
    torch.testing.assert_close(out[:, :5], F.elu(x))
    torch.testing.assert_close(out[:, 5:], F.elu(-x))
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = concat_elu(y)
    assert out.shape == (2, 6, 4, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat([F.elu(y), F.elu(-y)], 1))
    # Both signs survive: x is recoverable from the two halves.
    torch.testing.assert_close(torch.where(y > 0, out[:, :3], -out[:, 3:]), y)


def test_nin_is_a_per_pixel_linear_map() -> None:
    layer = NIN(5, 7)
    x = torch.randn(2, 5, 3, 4)
    w = layer.conv.weight[:, :, 0, 0]  # (7, 5), through the weight-norm parametrization
    want = torch.einsum("oc,bchw->bohw", w, x) + layer.conv.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), want)
    assert is_weight_normed(layer.conv) and not is_weight_normed(NIN(5, 7, weight_norm=False).conv)


# -- weight normalisation ------------------------------------------------------------------------


def test_weight_norm_dims_and_reconstruction() -> None:
    conv = apply_weight_norm(nn.Conv2d(3, 5, (2, 3)))
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert g.shape == (5, 1, 1, 1) and v.shape == (5, 3, 2, 3)
    torch.testing.assert_close(conv.weight, g * v / v.flatten(1).norm(dim=1).view(5, 1, 1, 1))
    deconv = apply_weight_norm(nn.ConvTranspose2d(3, 5, (2, 2), stride=2))
    g = deconv.parametrizations.weight.original0
    v = deconv.parametrizations.weight.original1
    assert g.shape == (1, 5, 1, 1) and v.shape == (3, 5, 2, 2)  # one g per OUTPUT channel
    norms = v.transpose(0, 1).flatten(1).norm(dim=1).view(1, 5, 1, 1)
    torch.testing.assert_close(deconv.weight, g * v / norms)
    lin = apply_weight_norm(nn.Linear(4, 6))
    assert lin.parametrizations.weight.original0.shape == (6, 1)


def test_weight_norm_counts_and_init_scale() -> None:
    # g adds one parameter per output channel.
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(DownShiftedConv2d(4, 8)) == 2 * 3 * 4 * 8 + 8 + 8  # v, b, g
    assert count(DownShiftedConv2d(4, 8, weight_norm=False)) == 2 * 3 * 4 * 8 + 8
    torch.manual_seed(0)
    a = DownShiftedConv2d(4, 8)
    torch.manual_seed(0)
    b = DownShiftedConv2d(4, 8, init_scale=0.1)
    torch.testing.assert_close(b.conv.weight, 0.1 * a.conv.weight)


def test_weight_norm_argument_errors() -> None:
    with pytest.raises(TypeError, match="module"):
        apply_weight_norm(nn.ReLU())
    conv = apply_weight_norm(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="already"):
        apply_weight_norm(conv)


class _Stack(nn.Module):
    """A module tree mixing every weight-normed layer type, with a non-normed layer in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a = DownShiftedConv2d(3, 6, stride=2)
        self.plain = nn.Conv2d(6, 6, 1)
        self.b = DownRightShiftedConvTranspose2d(6, 4, init_scale=0.1)
        self.c = NIN(4, 5)
        self.d = apply_weight_norm(nn.Linear(5, 7))

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        h = self.c(F.elu(self.b(self.plain(F.elu(self.a(x))))))
        h = self.d(h.permute(0, 2, 3, 1))
        return h if shift is None else h + shift


def _record(model: nn.Module, *args: object) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=name: outs.__setitem__(n, o))
        for name, m in model.named_modules()
        if is_weight_normed(m)
    ]
    model(*args)
    for h in hooks:
        h.remove()
    return outs


def test_data_dependent_init_normalises_every_layer() -> None:
    torch.manual_seed(0)
    model = _Stack()
    x = torch.randn(16, 3, 8, 8) * 3 + 1
    before = model.plain.weight.clone()
    assert data_dependent_init(model, x, torch.zeros(())) == 4
    assert torch.equal(model.plain.weight, before)  # layers without weight norm are untouched
    outs = _record(model, x)
    assert set(outs) == {"a.conv", "b.conv", "c.conv", "d"}
    for name, out in outs.items():
        ch = -1 if name == "d" else 1
        t = out.movedim(ch, -1).reshape(-1, out.shape[ch])
        target = 0.1 if name == "b.conv" else 1.0
        torch.testing.assert_close(t.mean(0), torch.zeros(t.shape[1]), atol=1e-5, rtol=0)
        std = t.std(0, unbiased=False)
        torch.testing.assert_close(std, torch.full_like(std, target), atol=1e-4, rtol=0)


def test_data_dependent_init_on_pixelcnn_pp_with_labels() -> None:
    from discretelik.backbones.pixelcnn_pp import PixelCNNPP

    torch.manual_seed(0)
    net = PixelCNNPP(nr_filters=8, nr_resnet=1, dropout=0.0, num_classes=3).eval()
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    labels = torch.arange(16) % 3
    n_layers = sum(is_weight_normed(m) for m in net.modules())
    assert data_dependent_init(net, x, labels) == n_layers
    for name, out in _record(net, x, labels).items():
        t = out.transpose(0, 1).reshape(out.shape[1], -1)
        target = 0.1 if name.endswith("conv2.conv") else 1.0
        assert t.mean(1).abs().max() < 1e-4, name
        assert (t.std(1, unbiased=False) - target).abs().max() < 1e-3, name
    assert torch.isfinite(net(x, labels)).all()
