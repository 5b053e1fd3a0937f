import pytest
import torch

import discretelik as dl


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(ValueError, match="pixelcnn"):
        dl.build("pixelcn", "dlm")
    with pytest.raises(ValueError, match="'dlm'"):
        dl.build("pixelcnn", "dml")


def test_unknown_option_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid options"):
        dl.build("pixelcnn", "dlm", preset="tiny", not_an_option=3)


def test_none_options_are_dropped() -> None:
    a = dl.backbone_config("pixelcnn", "tiny")
    b = dl.backbone_config("pixelcnn", "tiny", num_classes=None)
    assert a == b


def test_softmax_on_pixelcnn_gets_ordered_channels_dlm_does_not() -> None:
    assert dl.build("pixelcnn", "softmax", preset="tiny").backbone.channel_groups == 3
    assert dl.build("pixelcnn", "dlm", preset="tiny").backbone.channel_groups == 1
    assert dl.build("pixelcnn", "softmax", preset="tiny", channels=1).backbone.channel_groups == 1


def test_bits_per_dim_matches_log_prob() -> None:
    torch.manual_seed(0)
    model = dl.build("pixelcnn", "softmax", preset="tiny", bins=16)
    x = torch.randint(0, 16, (3, 3, 5, 6))
    lp = model.log_prob(x)
    assert lp.shape == (3,) and lp.dtype == torch.float32
    torch.testing.assert_close(model.bits_per_dim(x), -lp / (torch.log(torch.tensor(2.0)) * 90))
    # A model that knows nothing spreads mass roughly uniformly: bits/dim near log2(16) = 4.
    with torch.no_grad():
        assert 2.0 < float(model.bits_per_dim(x).mean()) < 8.0


def test_sample_argument_errors() -> None:
    model = dl.build("pixelcnn", "dlm", preset="tiny")
    with pytest.raises(ValueError, match="image_shape"):
        model.sample(1, (1, 4, 4))
    with pytest.raises(ValueError, match="n"):
        model.sample(0, (4, 4))
    image = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="known mask"):
        model.sample(1, (4, 4), known=(image, torch.zeros(1, 4, 4)))
    with pytest.raises(ValueError, match="known mask"):
        model.sample(1, (4, 4), known=(image, torch.zeros(1, 3, 4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="known image"):
        model.sample(1, (4, 4), known=(image + 300, torch.zeros(1, 4, 4, dtype=torch.bool)))


def test_fully_known_image_is_returned_unchanged() -> None:
    model = dl.build("pixelcnn", "dlm", preset="tiny")
    image = torch.randint(0, 256, (2, 3, 4, 4))
    out = model.sample(2, (4, 4), known=(image, torch.ones(2, 4, 4, dtype=torch.bool)))
    assert torch.equal(out, image)
