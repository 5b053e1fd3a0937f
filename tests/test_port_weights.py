"""``load_port_pixelcnn_pp``: weights of pclucas14/pixel-cnn-pp give the port's outputs.

The port cannot be imported here, so this file holds a small independent re-implementation of
its network in plain torch, written from its architecture: its module and parameter names,
``torch.nn.utils.weight_norm`` with the default ``dim=0`` (over the *input* channels of the
transposed convolutions), ``nin`` as ``nn.Linear`` on channels-last pixels, and its
likelihood (openai's ``discretized_mix_logistic_loss``, in float64, per image). A random
instance with non-trivial weight-norm scales and biases is converted and the outputs compared.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import discretelik as dl


def _wn(layer: nn.Module) -> nn.Module:
    # The port uses the (deprecated) hook-based weight norm: weight_g / weight_v, dim=0.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(layer)


def _concat_elu(x: Tensor) -> Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


def _down_shift(x: Tensor) -> Tensor:
    return F.pad(x[:, :, :-1, :], (0, 0, 1, 0))


def _right_shift(x: Tensor) -> Tensor:
    return F.pad(x[:, :, :, :-1], (1, 0, 0, 0))


class _Nin(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin_a = _wn(nn.Linear(n_in, n_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin_a(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-pixel dense layer


class _DownConv(nn.Module):
    def __init__(self, n_in, n_out, size=(2, 3), stride=1, shift_down=False) -> None:
        super().__init__()
        self.conv = _wn(nn.Conv2d(n_in, n_out, size, stride))
        self.pad = ((size[1] - 1) // 2, (size[1] - 1) // 2, size[0] - 1, 0)
        self.shift_down = shift_down

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.pad(x, self.pad))
        return _down_shift(x) if self.shift_down else x


class _DownRightConv(nn.Module):
    def __init__(self, n_in, n_out, size=(2, 2), stride=1, shift_right=False) -> None:
        super().__init__()
        self.conv = _wn(nn.Conv2d(n_in, n_out, size, stride))
        self.pad = (size[1] - 1, 0, size[0] - 1, 0)
        self.shift_right = shift_right

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.pad(x, self.pad))
        return _right_shift(x) if self.shift_right else x


class _DownDeconv(nn.Module):
    def __init__(self, n: int, size=(2, 3)) -> None:
        super().__init__()
        self.deconv = _wn(nn.ConvTranspose2d(n, n, size, 2, output_padding=1))
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = self.deconv(x)
        kh, kw = self.size
        side = (kw - 1) // 2
        return x[:, :, : x.shape[2] - kh + 1, side : x.shape[3] - side]


class _DownRightDeconv(nn.Module):
    def __init__(self, n: int, size=(2, 2)) -> None:
        super().__init__()
        self.deconv = _wn(nn.ConvTranspose2d(n, n, size, 2, output_padding=1))
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = self.deconv(x)
        kh, kw = self.size
        return x[:, :, : x.shape[2] - kh + 1, : x.shape[3] - kw + 1]


class _GatedResnet(nn.Module):
    def __init__(self, f: int, conv: type[nn.Module], skip: int) -> None:
        super().__init__()
        self.conv_input = conv(2 * f, f)
        if skip:
            self.nin_skip = _Nin(2 * skip * f, f)
        self.conv_out = conv(2 * f, 2 * f)

    def forward(self, x: Tensor, a: Tensor | None = None) -> Tensor:
        c = self.conv_input(_concat_elu(x))
        if a is not None:
            c = c + self.nin_skip(_concat_elu(a))
        a_, b_ = self.conv_out(_concat_elu(c)).chunk(2, dim=1)  # (dropout: eval mode)
        return x + a_ * torch.sigmoid(b_)


class _Streams(nn.Module):
    def __init__(self, n: int, f: int, u_skip: int, ul_skip: int) -> None:
        super().__init__()
        self.u_stream = nn.ModuleList(_GatedResnet(f, _DownConv, u_skip) for _ in range(n))
        self.ul_stream = nn.ModuleList(_GatedResnet(f, _DownRightConv, ul_skip) for _ in range(n))


class PortPixelCNN(nn.Module):
    """The port's ``PixelCNN`` (its names, shapes and forward pass), evaluation mode only."""

    def __init__(self, nr_resnet: int, nr_filters: int, nr_logistic_mix: int, input_channels: int):
        super().__init__()
        r, f, c = nr_resnet, nr_filters, input_channels
        self.down_layers = nn.ModuleList(_Streams(n, f, 1, 2) for n in (r, r + 1, r + 1))
        self.up_layers = nn.ModuleList(_Streams(r, f, 0, 1) for _ in range(3))
        self.downsize_u_stream = nn.ModuleList(_DownConv(f, f, stride=2) for _ in range(2))
        self.downsize_ul_stream = nn.ModuleList(_DownRightConv(f, f, stride=2) for _ in range(2))
        self.upsize_u_stream = nn.ModuleList(_DownDeconv(f) for _ in range(2))
        self.upsize_ul_stream = nn.ModuleList(_DownRightDeconv(f) for _ in range(2))
        self.u_init = _DownConv(c + 1, f, (2, 3), shift_down=True)
        self.ul_init = nn.ModuleList(
            [_DownConv(c + 1, f, (1, 3), shift_down=True),
             _DownRightConv(c + 1, f, (2, 1), shift_right=True)]
        )
        self.nin_out = _Nin(f, (3 if c == 1 else 10) * nr_logistic_mix)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        u_list, ul_list = [self.u_init(x)], [self.ul_init[0](x) + self.ul_init[1](x)]
        for i in range(3):
            streams = self.up_layers[i]
            for u_layer, ul_layer in zip(streams.u_stream, streams.ul_stream):
                u_list.append(u_layer(u_list[-1]))
                ul_list.append(ul_layer(ul_list[-1], a=u_list[-1]))
            if i != 2:
                u_list.append(self.downsize_u_stream[i](u_list[-1]))
                ul_list.append(self.downsize_ul_stream[i](ul_list[-1]))
        u, ul = u_list.pop(), ul_list.pop()
        for i in range(3):
            streams = self.down_layers[i]
            for u_layer, ul_layer in zip(streams.u_stream, streams.ul_stream):
                u = u_layer(u, a=u_list.pop())
                ul = ul_layer(ul, a=torch.cat([u, ul_list.pop()], dim=1))
            if i != 2:
                u, ul = self.upsize_u_stream[i](u), self.upsize_ul_stream[i](ul)
        assert not u_list and not ul_list
        return self.nin_out(F.elu(ul))


def port_split(out: Tensor, channels: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The port's unpacking of its output: ``(logits, means, log_scales, raw coeffs)``.

    ``out`` ``(B, P, H, W)`` -> logits ``(B, H, W, K)``, the others ``(B, H, W, C, K)``
    (coeffs ``(B, H, W, 3, K)`` for RGB in the pair order (G,R), (B,R), (B,G); else empty).
    """
    l = out.permute(0, 2, 3, 1)
    b, h, w, _ = l.shape
    per = 3 if channels == 3 else 2
    rest = l[..., k:].reshape(b, h, w, channels, per * k)
    coeffs = rest[..., 2 * k : 3 * k] if channels == 3 else rest[..., :0]
    return l[..., :k], rest[..., :k], rest[..., k : 2 * k], coeffs


def port_log_likelihood(x: Tensor, out: Tensor, k: int) -> Tensor:
    """openai's ``discretized_mix_logistic_loss`` (as the port), negated, per image, float64.

    ``x`` float ``(B, C, H, W)`` in ``[-1, 1]``; returns ``(B,)``. Asserts that openai's
    fallback for bin masses below 1e-5 (the density at the bin centre, where our likelihood
    stays exact) is not taken, so that both formulas must agree.
    """
    x, out = x.double(), out.double()
    c = x.shape[1]
    logits, means, log_scales, coeffs = port_split(out, c, k)
    log_scales = log_scales.clamp(min=-7.0)
    xv = x.permute(0, 2, 3, 1).unsqueeze(-1)  # (B, H, W, C, 1)
    if c == 3:
        co = torch.tanh(coeffs)
        m2 = means[..., 1, :] + co[..., 0, :] * xv[..., 0, :]
        m3 = means[..., 2, :] + co[..., 1, :] * xv[..., 0, :] + co[..., 2, :] * xv[..., 1, :]
        means = torch.stack([means[..., 0, :], m2, m3], dim=3)
    centred = xv - means
    inv = torch.exp(-log_scales)
    plus_in, min_in = inv * (centred + 1 / 255), inv * (centred - 1 / 255)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_sf_min = -F.softplus(min_in)
    mid_in = inv * centred
    log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in)
    middle = torch.where(
        cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5)
    )
    edge = (xv < -0.999) | (xv > 0.999)
    assert bool((cdf_delta > 1e-5)[~edge.expand_as(cdf_delta)].all()), "fallback branch taken"
    log_probs = torch.where(xv < -0.999, log_cdf_plus, torch.where(xv > 0.999, log_sf_min, middle))
    log_probs = log_probs.sum(3) + torch.log_softmax(logits, dim=-1)  # (B, H, W, K)
    return torch.logsumexp(log_probs, dim=-1).sum((1, 2))


SIZES = {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2}


def random_port(channels: int, seed: int = 0) -> PortPixelCNN:
    """A port network with every weight-norm ``g`` and bias random (not the defaults)."""
    torch.manual_seed(seed)
    net = PortPixelCNN(input_channels=channels, **SIZES)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(torch.empty_like(p).uniform_(0.3, 1.5))  # differs per input/output unit
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return net.eval()


def images(channels: int, n: int = 3, size: int = 8) -> Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g)
    x[0, :, 0, :3] = 0  # the open edge bins
    x[1, :, 2, :3] = 255
    return x


@pytest.mark.parametrize("channels", [3, 1])
def test_converted_weights_give_the_ports_outputs(channels: int) -> None:
    port = random_port(channels)
    model = dl.load_port_pixelcnn_pp(port.state_dict(), input_channels=channels, **SIZES)
    assert not model.training
    x = images(channels)
    k = SIZES["nr_logistic_mix"]
    with torch.no_grad():
        out = port(x.float() / 255 * 2 - 1)  # the port's rescaling
        ours = model.params(x)
    # (a) every role of the head's parameters equals the port's, unpacked the port's way.
    logits, loc, log_scale, coeff = model.head.layout.split(ours)  # (B,K,..), (B,K,C,H,W)...
    p_logits, p_means, p_log_scales, p_coeffs = port_split(out, channels, k)
    diffs = [
        (logits.permute(0, 2, 3, 1) - p_logits).abs().max(),
        (loc.permute(0, 3, 4, 2, 1) - p_means).abs().max(),
        (log_scale.permute(0, 3, 4, 2, 1) - p_log_scales).abs().max(),
        (coeff.permute(0, 3, 4, 2, 1) - p_coeffs).abs().max() if channels == 3 else torch.zeros(()),
    ]
    print(f"channels={channels}: max abs difference of the head parameters {max(diffs):.2e}")
    assert max(diffs) < 1e-5 * max(1.0, float(out.abs().max()))
    assert float(out.std()) > 0.1  # a non-degenerate network, not all-equal outputs
    # (b) the log-likelihood equals the port's loss formula (float64) per image.
    expected = port_log_likelihood(x.float() / 255 * 2 - 1, out, k)
    got = model.log_prob(x).double()
    rel = ((got - expected).abs() / expected.abs()).max()
    print(f"channels={channels}: max relative difference of log p(x) {rel:.2e}")
    assert rel < 1e-4


def test_dataparallel_prefix_path_and_device_free_loading(tmp_path) -> None:
    port = random_port(3, seed=2)
    x = images(3, n=2)
    reference = dl.load_port_pixelcnn_pp(port.state_dict(), **SIZES).log_prob(x)
    prefixed = {f"module.{k}": v for k, v in port.state_dict().items()}
    path = tmp_path / "port.pth"
    torch.save(prefixed, path)
    for source in (prefixed, path, str(path)):
        model = dl.load_port_pixelcnn_pp(source, **SIZES)
        torch.testing.assert_close(model.log_prob(x), reference, rtol=0, atol=0)


def test_plain_nin_layers_of_older_port_versions() -> None:
    # Older versions of the port had nin = plain nn.Linear (lin_a.weight, no g / v).
    port = random_port(3, seed=3)
    sd = port.state_dict()
    plain = {}
    for key, value in sd.items():
        if ".lin_a.weight_" in key:
            prefix = key.rsplit(".", 1)[0]
            if f"{prefix}.weight" not in plain:
                g, v = sd[f"{prefix}.weight_g"], sd[f"{prefix}.weight_v"]
                plain[f"{prefix}.weight"] = g * v / v.norm(dim=1, keepdim=True)
        else:
            plain[key] = value
    x = images(3, n=2)
    torch.testing.assert_close(
        dl.load_port_pixelcnn_pp(plain, **SIZES).log_prob(x),
        dl.load_port_pixelcnn_pp(sd, **SIZES).log_prob(x),
        rtol=1e-5, atol=1e-3,
    )


def test_missing_unexpected_and_misshapen_keys_are_named() -> None:
    sd = random_port(3).state_dict()
    missing = dict(sd)
    del missing["up_layers.1.ul_stream.0.nin_skip.lin_a.weight_g"]
    with pytest.raises(ValueError, match=r"no key 'up_layers\.1\.ul_stream\.0\.nin_skip"):
        dl.load_port_pixelcnn_pp(missing, **SIZES)
    extra = dict(sd, **{"down_layers.0.u_stream.1.conv_out.conv.bias": torch.zeros(16)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*down_layers\.0\.u_stream\.1"):
        dl.load_port_pixelcnn_pp(extra, **SIZES)
    wrong = dict(sd, **{"upsize_u_stream.0.deconv.weight_g": torch.ones(1, 8, 1, 1)})
    with pytest.raises(ValueError, match=r"'upsize_u_stream\.0\.deconv\.weight_g'.*\(1, 8, 1, 1\)"):
        dl.load_port_pixelcnn_pp(wrong, **SIZES)
    # The wrong size: the first shape that differs is named, with the sizes assumed.
    with pytest.raises(ValueError, match=r"'u_init\.conv\.weight_v'.*nr_filters=16"):
        dl.load_port_pixelcnn_pp(sd, nr_resnet=1, nr_filters=16, nr_logistic_mix=2)
    # A port with nr_resnet=2 loaded as nr_resnet=1: its second layers are left over.
    torch.manual_seed(0)
    deeper = PortPixelCNN(2, SIZES["nr_filters"], SIZES["nr_logistic_mix"], 3).state_dict()
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*down_layers\.0\.u_stream\.1\."):
        dl.load_port_pixelcnn_pp(deeper, **SIZES)
    bad = dict(sd, **{"nin_out.lin_a.bias": torch.full((20,), float("nan"))})
    with pytest.raises(ValueError, match=r"'nin_out\.lin_a\.bias'\] has non-finite"):
        dl.load_port_pixelcnn_pp(bad, **SIZES)


def test_bad_arguments() -> None:
    sd = random_port(3).state_dict()
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        dl.load_port_pixelcnn_pp([1, 2], **SIZES)
    ints = dict(sd, **{"u_init.conv.bias": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"state_dict\['u_init\.conv\.bias'\] must be a floating"):
        dl.load_port_pixelcnn_pp(ints, **SIZES)
    with pytest.raises(ValueError, match="input_channels must be 1 or 3"):
        dl.load_port_pixelcnn_pp(sd, input_channels=2, **SIZES)
    with pytest.raises(ValueError, match=r"head_kwargs must not set \['mixtures'\]"):
        dl.load_port_pixelcnn_pp(sd, head_kwargs={"mixtures": 3}, **SIZES)


def test_port_weight_norm_convention_is_what_the_converter_assumes() -> None:
    # torch.nn.utils.weight_norm's default dim=0 is the input channel of a transposed conv.
    deconv = _wn(nn.ConvTranspose2d(3, 5, (2, 3), 2, output_padding=1))
    assert deconv.weight_g.shape == (3, 1, 1, 1) and deconv.weight_v.shape == (3, 5, 2, 3)
    lin = _wn(nn.Linear(4, 6))
    assert lin.weight_g.shape == (6, 1) and lin.weight_v.shape == (6, 4)


@pytest.mark.parametrize("channels", [3, 1])
def test_listed_shapes_are_the_ports_state_dict(channels: int) -> None:
    port = random_port(channels).state_dict()
    listed = dl.port_pixelcnn_pp_shapes(input_channels=channels, **SIZES)
    assert listed == {k: tuple(v.shape) for k, v in port.items()}
    # A stand-in of those shapes loads (what the guide script does without the real file).
    stand_in = {k: torch.randn(shape) for k, shape in listed.items()}
    model = dl.load_port_pixelcnn_pp(stand_in, input_channels=channels, map_location="cpu", **SIZES)
    assert model.params(images(channels, n=2)).shape == (2, (10 if channels == 3 else 3) * 2, 8, 8)
