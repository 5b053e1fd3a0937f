"""Fast sampling (the backbones' sampling caches): the cached features equal the full forward's at
every pixel, the cached sampler draws the same images as full recomputation, and the dispatch
in ``sample_raster`` falls back cleanly.

The feature checks run in float64 on a canvas that is revealed pixel by pixel with NaN
everywhere else, so reading any pixel at or after the current one poisons the result; some
positions are skipped to exercise the catch-up that known pixels need.
"""

from __future__ import annotations

import pytest
import torch

import discretelik as dl
from discretelik import GatedPixelCNNCache, PixelCNNPPCache, SamplingCache

GATED = "gated_pixelcnn"
PP = "pixelcnn++"


def backbone(name: str, **kwargs) -> dl.Backbone:
    torch.manual_seed(0)
    return dl.create_backbone(name, preset="tiny", **kwargs).double().eval()


def check_cache_features(net: dl.Backbone, h: int, w: int, cond=None, skip: int = 3) -> None:
    """Compare ``step`` with the full forward at every pixel (every ``skip``-th one skipped)."""
    n = 2
    gen = torch.Generator().manual_seed(h * w)
    x = torch.rand(n, net.in_channels, h, w, dtype=torch.float64, generator=gen) * 2 - 1
    with torch.no_grad():
        full = net(x, cond)
    cache = net.sampling_cache(n, (h, w), cond)
    assert isinstance(cache, SamplingCache)
    canvas = torch.full_like(x, float("nan"))  # pixels not yet "drawn" are NaN
    for i in range(h):
        for j in range(w):
            if (i * w + j) % skip != skip - 1:
                feats = cache.step(canvas, i, j)
                assert feats.shape == (n, net.out_channels) and feats.dtype == torch.float64
                torch.testing.assert_close(feats, full[:, :, i, j], rtol=0, atol=1e-10)
            canvas[:, :, i, j] = x[:, :, i, j]


def labels(n: int = 2) -> torch.Tensor:
    return torch.tensor([2, 0][:n])


# -- exact features -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (5, 4), (6, 7)])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "label"])
def test_gated_cache_matches_forward(size: tuple[int, int], conditional: bool) -> None:
    kwargs = dict(num_classes=3) if conditional else {}
    check_cache_features(backbone(GATED, **kwargs), *size, labels() if conditional else None)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_gated_cache_map_conditioning_skips_and_wide_kernels(upsample: str) -> None:
    net = backbone(
        GATED,
        num_classes=3,
        cond_channels=2,
        cond_upsample=upsample,
        skip_connections=True,
        kernel_size=5,
        n_layers=4,
    )
    cmap = torch.randn(2, 2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_cache_features(net, 5, 7, {"label": labels(), "map": cmap}, skip=4)


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (8, 12), (12, 4), (16, 8)])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "label"])
def test_pixelcnn_pp_cache_matches_forward(size: tuple[int, int], conditional: bool) -> None:
    kwargs = dict(num_classes=3) if conditional else {}
    check_cache_features(backbone(PP, **kwargs), *size, labels() if conditional else None)


def test_pixelcnn_pp_cache_deeper_blocks_no_weight_norm_and_dropout_off_in_eval() -> None:
    check_cache_features(backbone(PP, nr_resnet=2, nr_filters=6, dropout=0.5), 8, 8, skip=5)
    net = backbone(PP, weight_norm=False, num_classes=3, in_channels=1)
    check_cache_features(net, 4, 8, labels())


def test_caches_are_the_backbones_own() -> None:
    assert isinstance(backbone(GATED).sampling_cache(1, (3, 3)), GatedPixelCNNCache)
    assert isinstance(backbone(PP).sampling_cache(1, (4, 4)), PixelCNNPPCache)


# -- sampling -------------------------------------------------------------------------------------


def draw(model, cached, **kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return dl.sample_raster(model, 2, kwargs.pop("shape"), generator=gen, cached=cached, **kwargs)


@pytest.mark.parametrize("name", [GATED, PP])
@pytest.mark.parametrize("head", dl.list_heads())
def test_cached_sampler_draws_the_same_images(name: str, head: str) -> None:
    torch.manual_seed(0)
    model = dl.build(name, head, preset="tiny", num_classes=3)
    shape = (4, 8) if name == PP else (5, 3)
    image = torch.randint(0, 256, (2, 3, *shape), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, *shape, dtype=torch.bool)
    mask[:, 0] = True  # the first row is given (completion)
    mask[0, 2, 1] = True  # one pixel of one image (inpainting, still drawn for the other)
    mask[:, 3, 2] = True  # one pixel of both images (skipped: the cache must catch up)
    kwargs = dict(shape=shape, cond=labels(), known=(image, mask))
    naive = draw(model, False, **kwargs)
    fast = draw(model, None, **kwargs)
    assert torch.equal(naive, fast)
    assert torch.equal(fast.permute(0, 2, 3, 1)[mask], image.permute(0, 2, 3, 1)[mask])
    assert torch.equal(draw(model, True, **kwargs), fast)


def test_default_uses_the_cache_and_false_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = dl.build(GATED, "softmax", preset="tiny", bins=4)
    made = []
    original = type(model.backbone).sampling_cache

    def spy(self, *args, **kwargs):
        made.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.backbone), "sampling_cache", spy)
    model.sample(1, (3, 3))
    assert made == [(1, (3, 3), None)]
    dl.sample_raster(model, 1, (3, 3), cached=False)
    assert len(made) == 1


def test_training_mode_is_restored_and_dropout_is_off() -> None:
    torch.manual_seed(0)
    model = dl.build(PP, "dlm", preset="tiny", dropout=0.5)
    model.train()
    shape = (4, 4)
    assert torch.equal(draw(model, False, shape=shape), draw(model, True, shape=shape))
    assert model.training


def test_fallback_for_backbones_without_a_cache_and_channel_groups() -> None:
    torch.manual_seed(0)
    grouped = dl.build("pixelcnn", "softmax", preset="tiny", bins=4)  # channel_groups == 3
    assert grouped.backbone.channel_groups == 3
    assert torch.equal(draw(grouped, None, shape=(3, 3)), draw(grouped, False, shape=(3, 3)))
    with pytest.raises(ValueError, match="cached=True"):
        draw(grouped, True, shape=(3, 3))
    plain = dl.build("pixelcnn", "dlm", preset="tiny")
    assert not hasattr(plain.backbone, "sampling_cache")
    with pytest.raises(ValueError, match="no usable sampling_cache"):
        draw(plain, True, shape=(3, 3))
    with pytest.raises(TypeError, match="cached"):
        draw(plain, "yes", shape=(3, 3))


class Doubled(dl.GatedPixelCNN):
    """A subclass whose features differ from the parent's: the inherited cache must not be used."""

    def forward(self, x, cond=None):
        return 2 * super().forward(x, cond)


def test_subclass_overriding_forward_falls_back() -> None:
    torch.manual_seed(0)
    model = dl.build(GATED, "dlm", preset="tiny")
    model.backbone = Doubled(model.backbone.config)
    assert torch.equal(draw(model, None, shape=(3, 3)), draw(model, False, shape=(3, 3)))
    with pytest.raises(ValueError, match="no usable sampling_cache"):
        draw(model, True, shape=(3, 3))


# -- errors ---------------------------------------------------------------------------------------


def test_step_argument_errors() -> None:
    cache = backbone(GATED).sampling_cache(2, (3, 4))
    canvas = torch.zeros(2, 3, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="canvas must have shape"):
        cache.step(canvas[:, :, :2], 0, 0)
    with pytest.raises(TypeError, match="canvas"):
        cache.step(canvas.long(), 0, 0)
    with pytest.raises(ValueError, match="j must lie"):
        cache.step(canvas, 0, 4)
    with pytest.raises(TypeError, match="i must be an int"):
        cache.step(canvas, 0.0, 0)
    cache.step(canvas, 1, 2)
    with pytest.raises(ValueError, match="raster order"):
        cache.step(canvas, 1, 2)
    with pytest.raises(ValueError, match="raster order"):
        cache.step(canvas, 0, 3)


def test_cache_construction_errors() -> None:
    pp = backbone(PP, dropout=0.5)
    with pytest.raises(ValueError, match="multiples of 4"):
        pp.sampling_cache(1, (6, 8))
    with pytest.raises(ValueError, match="n must be"):
        pp.sampling_cache(0, (4, 4))
    with pytest.raises(TypeError, match="image_shape"):
        pp.sampling_cache(1, 4)
    pp.train()
    with pytest.raises(ValueError, match="evaluation mode"):
        pp.sampling_cache(1, (4, 4))
    with pytest.raises(ValueError, match="cond must give class labels"):
        backbone(GATED, num_classes=3).sampling_cache(2, (3, 3))
    with pytest.raises(ValueError, match="cond label must have shape"):
        backbone(PP, num_classes=3).sampling_cache(2, (4, 4), torch.tensor([1]))


# -- the static-buffer step of the CUDA-graph sampler ---------------------------------------------


@pytest.mark.parametrize("name", [GATED, PP])
@pytest.mark.parametrize("head", dl.list_heads())
def test_uncaptured_static_step_draws_the_naive_images_and_params(name: str, head: str) -> None:
    """The step the CUDA graphs capture (positions read from a device tensor, every buffer
    written in place), run eagerly: the naive sampler's images and (up to rounding) params."""
    torch.manual_seed(0)
    model = dl.build(name, head, preset="tiny", num_classes=3)
    shape = (8, 4) if name == PP else (5, 3)
    image = torch.randint(0, 256, (2, 3, *shape), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, *shape, dtype=torch.bool)
    mask[:, 0, 1:] = True  # known in both images: skipped, the cache still advances
    mask[1, 2, 1] = True  # known in one image: drawn for the other
    mask[:, 4, 0] = True  # a skipped first column (the row's u / vertical work still runs)
    kwargs = dict(shape=shape, cond=labels(), known=(image, mask), return_params=True)
    naive, naive_params = draw(model, False, cuda_graph="off", **kwargs)
    static, static_params = draw(model, None, cuda_graph="uncaptured", **kwargs)
    eager, eager_params = draw(model, None, cuda_graph="off", **kwargs)
    assert torch.equal(static, naive) and torch.equal(eager, naive)
    skipped = mask.all(dim=0)
    assert static_params.isnan()[:, :, skipped].all() and naive_params.isnan()[:, :, skipped].all()
    torch.testing.assert_close(static_params[:, :, ~skipped], naive_params[:, :, ~skipped])
    assert torch.equal(static_params.nan_to_num(), eager_params.nan_to_num())  # same operations


def test_cpu_auto_runs_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = dl.build(PP, "dlm", preset="tiny")
    import discretelik.sampling as sampling

    def fail(*args, **kwargs):
        raise AssertionError("StaticSteps used on the CPU without cuda_graph='uncaptured'")

    monkeypatch.setattr(sampling, "StaticSteps", fail)
    assert torch.equal(draw(model, None, shape=(4, 4)), draw(model, False, shape=(4, 4)))


def test_params_of_channel_groups_are_the_last_pass() -> None:
    torch.manual_seed(0)
    model = dl.build("pixelcnn", "softmax", preset="tiny", bins=4)  # channel_groups == 3
    images, params = draw(model, None, shape=(3, 3), return_params=True)
    with torch.no_grad():
        full = model.params(images)
    torch.testing.assert_close(params, full)  # causal: the finished image gives the same params


def test_cuda_graph_argument_errors() -> None:
    torch.manual_seed(0)
    model = dl.build(GATED, "dlm", preset="tiny")
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        draw(model, None, shape=(3, 3), cuda_graph="yes")
    with pytest.raises(TypeError, match="cuda_graph must be one of"):
        draw(model, None, shape=(3, 3), cuda_graph=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        draw(model, None, shape=(3, 3), cuda_graph="require")
    with pytest.raises(ValueError, match="needs the cached sampler"):
        draw(model, False, shape=(3, 3), cuda_graph="uncaptured")
    with pytest.raises(TypeError, match="return_params"):
        draw(model, None, shape=(3, 3), return_params=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [GATED, PP])
@pytest.mark.parametrize("head", dl.list_heads())
def test_cuda_graph_draws_what_the_eager_step_draws(name: str, head: str) -> None:
    """On CUDA: the replayed graphs consume the generator as the eager step does (graph-safe
    Philox states), so they draw the same images; no capture falls back (no warning)."""
    import warnings

    torch.manual_seed(0)
    model = dl.build(name, head, preset="tiny", num_classes=3).cuda()
    shape = (8, 8)
    out = {}
    for mode in ("off", "require", "auto"):
        gen = torch.Generator("cuda").manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out[mode] = dl.sample_raster(model, 3, shape, cond=torch.tensor([0, 1, 2]).cuda(),
                                         generator=gen, cuda_graph=mode, return_params=True)
    for mode in ("require", "auto"):
        assert torch.equal(out[mode][0], out["off"][0]), mode
        torch.testing.assert_close(out[mode][1], out["off"][1], rtol=0, atol=1e-5)
