"""Review regressions for the backbones, their building blocks and the sampling caches."""

from __future__ import annotations

import pytest
import torch

import discretelik as dl

CONDITIONAL = ["pixelcnn", "gated_pixelcnn", "row_lstm", "diagonal_bilstm", "pixelcnn++"]


@pytest.mark.parametrize("name", CONDITIONAL)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_any_integer_label_dtype_gives_the_int64_features(name: str, dtype: torch.dtype) -> None:
    # split_cond accepts every integer dtype; the embeddings need int64 (or int32) indices.
    torch.manual_seed(0)
    net = dl.create_backbone(name, preset="tiny", num_classes=4).eval()
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    label = torch.tensor([1, 3])
    torch.testing.assert_close(net(x, label.to(dtype)), net(x, label))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["pixelcnn", "gated_pixelcnn"])
def test_causality_checks_accept_a_network_on_the_gpu(name: str) -> None:
    from discretelik.testing import check_causality, dependency_map, receptive_field

    net = dl.create_backbone(name, preset="tiny", num_classes=3).cuda()
    cond = torch.tensor([1], device="cuda")
    check_causality(net, (3, 4, 5), cond=cond)
    assert not dependency_map(net, (3, 4, 5), (1, 2), cond=cond)[:, :1].any()
    assert not receptive_field(net, (3, 4, 5), (1, 2), cond=cond)[1:].any()
    assert next(net.parameters()).device.type == "cuda"  # the checks work on a copy


def test_causality_checks_take_any_mapping_as_cond() -> None:
    # split_cond accepts any Mapping; the checker must cast and repeat it like a dict.
    from types import MappingProxyType

    from discretelik.testing import check_causality

    torch.manual_seed(0)
    net = dl.create_backbone("pixelcnn", preset="tiny", num_classes=3, cond_channels=2)
    cond = MappingProxyType({"label": torch.tensor([1]), "map": torch.randn(1, 2, 2, 3)})
    check_causality(net, (3, 4, 5), cond=cond)
