"""Regression tests for defects found in review of the heads, model, sampler and registry."""

from __future__ import annotations

import pytest
import torch

import discretelik as dl
from discretelik.heads.softmax import DiscreteSoftmax
from discretelik.registry import _BACKBONES, _HEADS, register_backbone, register_head


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    for registry in (_HEADS, _BACKBONES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))


def test_build_rejects_head_kwargs_that_conflict_with_build_arguments() -> None:
    # bins/channels given in head_kwargs were silently overwritten by build's own values.
    with pytest.raises(ValueError, match="head_kwargs"):
        dl.build("pixelcnn", "softmax", preset="tiny", channels=1, bins=4, head_kwargs={"bins": 16})
    with pytest.raises(ValueError, match="head_kwargs"):
        dl.build("pixelcnn", "dlm", preset="tiny", head_kwargs={"channels": 1})
    with pytest.raises(ValueError, match="head_kwargs"):
        dl.build("pixelcnn", "dlm", preset="tiny", head_kwargs={"in_channels": 7})


def test_float64_model_log_prob_and_sample() -> None:
    # The image was always scaled to float32, so a model in float64 failed in its first conv.
    torch.manual_seed(0)
    model = dl.build("pixelcnn", "dlm", preset="tiny", channels=1, bins=4).double()
    x = torch.randint(0, 4, (2, 1, 4, 4))
    lp = model.log_prob(x)
    assert lp.dtype == torch.float64 and lp.shape == (2,)
    assert model.sample(1, (2, 2), cached=False).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("shape", [(4.5, 4), (True, 4), (1, 4.0, 4)])
def test_sample_rejects_non_integer_image_shape(shape: tuple) -> None:
    # int() silently truncated 4.5 -> 4 (and took True as 1).
    model = dl.build("pixelcnn", "dlm", preset="tiny", channels=1, bins=4)
    with pytest.raises(TypeError, match="image_shape"):
        model.sample(1, shape)


def test_register_rejects_a_string_as_aliases(isolated: None) -> None:
    # aliases="ab" registered the one-letter aliases "a" and "b".
    with pytest.raises(TypeError, match="aliases"):
        register_head("fresh_head", aliases="ab")(DiscreteSoftmax)
    with pytest.raises(TypeError, match="aliases"):
        register_backbone("fresh_backbone", aliases="ab")(DiscreteSoftmax)
    assert "a" not in _HEADS._aliases and "a" not in _BACKBONES._aliases


@pytest.mark.parametrize("event_shape", [(2.5, 2), (True, 4), (3, 4.0)])
def test_bits_per_dim_rejects_non_integer_event_shape(event_shape: tuple) -> None:
    # int() silently truncated 2.5 -> 2, giving a wrong number of dimensions.
    with pytest.raises(TypeError, match="event_shape"):
        dl.bits_per_dim(torch.tensor([-10.0]), event_shape)


def test_sampling_with_known_pixels_does_not_sync_per_pixel() -> None:
    # ``bool(mask[:, i, j].all())`` read the mask once per pixel: a device sync per pixel on a
    # GPU that even ``set_default_validate_args(False)`` did not turn off.
    from torch.distributions import Distribution
    from torch.overrides import TorchFunctionMode

    reads = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__}

    class CountReads(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            if func in reads:
                self.n += 1
            return func(*args, **(kwargs or {}))

    model = dl.build("pixelcnn", "dlm", preset="tiny", channels=1, bins=4)
    image = torch.randint(0, 4, (2, 1, 6, 6))
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, :2] = True
    default = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        with CountReads() as counter:
            gen = torch.Generator().manual_seed(0)
            out = model.sample(2, (6, 6), known=(image, mask), generator=gen)
    finally:
        Distribution.set_default_validate_args(default)
    assert torch.equal(out[:, :, :2], image[:, :, :2])
    assert counter.n <= 3, f"{counter.n} host reads of tensors for 36 pixels"


def test_bfloat16_model_log_prob() -> None:
    # As for float64: a model converted with .to(torch.bfloat16) got a float32 image.
    torch.manual_seed(0)
    model = dl.build("pixelcnn", "softmax", preset="tiny", channels=1, bins=4).to(torch.bfloat16)
    lp = model.log_prob(torch.randint(0, 4, (2, 1, 4, 4)))
    assert lp.dtype == torch.float32 and lp.shape == (2,) and bool(lp.isfinite().all())


@pytest.mark.parametrize("name", ["dlm", "gaussian", "softmax"])
def test_sample_shape_errors_name_the_argument(name: str) -> None:
    head = dl.create_head(name, channels=1, bins=4)
    dist = head.distribution(torch.randn(2, head.param_channels, 3, 3))
    with pytest.raises(TypeError, match="sample_shape"):
        dist.sample(5)  # an int, not a shape
    with pytest.raises(ValueError, match="sample_shape"):
        dist.sample((-1,))


def test_sample_generator_errors_name_the_argument() -> None:
    head = dl.create_head("softmax", channels=1, bins=4)
    dist = head.distribution(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="generator"):
        dist.sample(generator=42)
    # A generator on another device than the parameters (cuda params with a CPU generator in
    # practice; meta params stand in for them on a CPU-only machine, where it went unnoticed).
    meta = head.distribution(torch.randn(2, 4, 3, 3, device="meta"), validate_args=False)
    with pytest.raises(ValueError, match="generator"):
        meta.sample(generator=torch.Generator())


def test_autoregressive_model_rejects_non_backbone_and_non_head() -> None:
    # A Conv2d has in_channels/out_channels and got as far as an AttributeError.
    model = dl.build("pixelcnn", "dlm", preset="tiny", channels=1, bins=4)
    with pytest.raises(TypeError, match="backbone"):
        dl.AutoregressiveModel(torch.nn.Conv2d(1, model.backbone.out_channels, 1), model.head)
    with pytest.raises(TypeError, match="head"):
        dl.AutoregressiveModel(model.backbone, torch.nn.Conv2d(model.backbone.out_channels, 1, 1))


def test_build_rejects_head_kwargs_that_is_not_a_mapping() -> None:
    with pytest.raises(TypeError, match="head_kwargs"):
        dl.build("pixelcnn", "dlm", preset="tiny", head_kwargs="k=5")  # type: ignore[arg-type]


def test_list_rejects_a_non_string_pattern() -> None:
    with pytest.raises(TypeError, match="pattern"):
        dl.list_heads(5)  # type: ignore[arg-type]


def test_sample_accepts_numpy_integer_image_shape() -> None:
    np = pytest.importorskip("numpy")
    model = dl.build("pixelcnn", "dlm", preset="tiny", channels=1, bins=4)
    assert model.sample(1, (np.int64(2), np.int64(3))).shape == (1, 1, 2, 3)


@pytest.mark.parametrize("name", ["dlm", "gaussian"])
def test_min_log_scale_that_overflows_float32_is_rejected(name: str) -> None:
    # Below about -88, exp(-log_scale) is inf in float32 and a bin edge at the location gives
    # 0 * inf = nan; the option was accepted and every log-prob and mean came out nan.
    with pytest.raises(ValueError, match="min_log_scale"):
        dl.create_head(name, channels=1, mixtures=1, min_log_scale=-100.0)
    head = dl.create_head(
        name, channels=1, mixtures=1, bins=256, coupling=False, min_log_scale=-60.0
    )
    params = torch.zeros(1, 3, 1, 1)
    params[:, 2] = -100.0  # clamped to -60
    dist = head.distribution(params)
    assert bool(dist.log_prob(torch.full((1, 1, 1, 1), 128)).isfinite().all())
    assert bool(dist.mean.isfinite().all())


def test_mixture_mean_has_no_gradient_softmax_mean_has_one() -> None:
    """As the docstrings say: the mixture heads' mean is computed without autograd."""
    from discretelik.heads.logistic import DiscretizedLogisticMixtureDistribution
    from discretelik.heads.softmax import DiscreteSoftmaxDistribution

    logits = torch.randn(1, 3 * 4, 2, 2, requires_grad=True)
    assert DiscreteSoftmaxDistribution(logits, 3, 4).mean.requires_grad
    params = torch.randn(1, 20, 2, 2, requires_grad=True)
    assert not DiscretizedLogisticMixtureDistribution(params, mixtures=2, bins=8).mean.requires_grad
