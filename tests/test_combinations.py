"""The registry drives these tests: every backbone x every head gets the same battery.

A newly registered backbone (with a ``"tiny"`` preset) or head is covered with nobody editing
this file.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.testing import check_causality

COMBOS = list(itertools.product(dl.list_backbones(), dl.list_heads()))
IDS = [f"{b}+{h}" for b, h in COMBOS]


def tiny(backbone: str, head: str, **kwargs) -> dl.AutoregressiveModel:
    torch.manual_seed(0)
    return dl.build(backbone, head, preset="tiny", **kwargs)


def test_every_builtin_is_registered() -> None:
    assert {"dlm", "softmax", "gaussian"} <= set(dl.list_heads())
    assert {"pixelcnn", "gated_pixelcnn", "pixelcnn++"} <= set(dl.list_backbones())


@pytest.mark.parametrize(("backbone", "head"), COMBOS, ids=IDS)
def test_causality(backbone: str, head: str) -> None:
    model = tiny(backbone, head)
    m = model.backbone.size_multiple

    @settings(max_examples=2)
    @given(h=st.integers(1, 2), w=st.integers(1, 2), seed=st.integers(0, 2**16))
    def check(h: int, w: int, seed: int) -> None:
        size = (model.channels, 4 * h if m > 1 else 3 + 2 * h, 4 * w if m > 1 else 3 + 2 * w)
        check_causality(model, size, seed=seed)

    check()


@pytest.mark.parametrize(("backbone", "head"), COMBOS, ids=IDS)
def test_sampling_shapes_known_pixels_and_seed(backbone: str, head: str) -> None:
    model = tiny(backbone, head, channels=3)
    shape = (4, 4)
    gen = torch.Generator().manual_seed(1)
    first = model.sample(2, shape, generator=gen)
    assert first.shape == (2, 3, 4, 4) and first.dtype == torch.int64
    assert int(first.min()) >= 0 and int(first.max()) <= model.bins - 1
    again = model.sample(2, shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    other = model.sample(2, shape, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(first, other)

    image = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True  # the top half is given: completion
    mask[1, 3, 3] = True  # and one late pixel: inpainting
    out = model.sample(2, shape, known=(image, mask), generator=gen)
    assert torch.equal(out.permute(0, 2, 3, 1)[mask], image.permute(0, 2, 3, 1)[mask])


@pytest.mark.parametrize(("backbone", "head"), COMBOS, ids=IDS)
def test_learns_on_real_images(backbone: str, head: str) -> None:
    images, _ = load_bundled("cifar10", "train")
    x = images[:16, :, :8, :8].long()
    model = tiny(backbone, head)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        model.eval()
        start = model.bits_per_dim(x).mean().item()
    model.train()
    for _ in range(40):
        opt.zero_grad()
        loss = model.bits_per_dim(x).mean()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = model.bits_per_dim(x).mean().item()
    assert end < 0.85 * start, f"bits/dim {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("backbone", dl.list_backbones())
def test_bad_images_are_rejected(backbone: str) -> None:
    model = tiny(backbone, "dlm")
    x = torch.randint(0, 256, (2, 3, 8, 8))
    with pytest.raises(TypeError, match="x"):
        model.log_prob(x.float())
    with pytest.raises(ValueError, match="channels"):
        model.log_prob(x[:, :2])
    too_big = x.clone()
    too_big[0, 0, 0, 0] = 256
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        model.log_prob(too_big)
    with pytest.raises(ValueError, match="cond"):
        model.log_prob(x, cond=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("backbone", dl.list_backbones())
def test_class_conditional_needs_labels(backbone: str) -> None:
    fields = dl.backbone_config(backbone, "tiny").__dataclass_fields__
    if "num_classes" not in fields:
        pytest.skip(f"{backbone} has no class conditioning")
    model = tiny(backbone, "dlm", num_classes=10)
    x = torch.randint(0, 256, (2, 3, 8, 8))
    with pytest.raises(ValueError, match="cond"):
        model.log_prob(x)
    with pytest.raises(ValueError, match="cond"):
        model.log_prob(x, cond=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cond"):
        model.log_prob(x, cond=torch.tensor([0, 1, 2]))
    lp0 = model.log_prob(x, cond=torch.tensor([0, 0]))
    lp1 = model.log_prob(x, cond=torch.tensor([1, 1]))
    assert lp0.shape == (2,)
    # Labels enter the network: different labels give different likelihoods once trained a bit
    # or at init (class embeddings are random unless zero-initialised).
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (-model.log_prob(x, cond=torch.tensor([1, 1])).mean()).backward()
        opt.step()
    assert not torch.allclose(model.log_prob(x, cond=torch.tensor([0, 0])), model.log_prob(x, cond=torch.tensor([1, 1])))
    del lp0, lp1
