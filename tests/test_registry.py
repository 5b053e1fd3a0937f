"""Registry tests: names, aliases, globs, errors, ``None`` dropping and entry-point plugins.

Every test that registers something works on copies of the registry tables (``isolated``), so
nothing it adds outlives the test.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import discretelik.backbones  # noqa: F401  (registers the built-in backbones)
import discretelik.heads  # noqa: F401  (registers the built-in heads)
from discretelik import (
    backbone_config,
    backbone_presets,
    create_backbone,
    create_head,
    get_backbone,
    get_head,
    list_backbones,
    list_heads,
    register_backbone,
    register_head,
)
from discretelik.heads.softmax import DiscreteSoftmax
from discretelik.registry import _BACKBONES, _HEADS
from discretelik.testing.heads import check_head_contract

PLUGIN_MODULES = ("dl_fake_plugin_heads", "dl_fake_plugin_decorated")


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give both registries private copies of their tables for the duration of a test."""
    for registry in (_HEADS, _BACKBONES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
        monkeypatch.setattr(registry, "_entry_points_loaded", registry._entry_points_loaded)
    yield
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


# -- heads -----------------------------------------------------------------------------------
def test_builtin_heads_and_alias() -> None:
    assert "softmax" in list_heads()
    assert get_head("categorical") is get_head("softmax") is DiscreteSoftmax
    assert "categorical" not in list_heads()  # listings show canonical names only


def test_register_get_list_glob(isolated: None) -> None:
    @register_head("toy_a", aliases=("toy_alias",))
    class ToyA(DiscreteSoftmax):
        pass

    @register_head("toy_b")
    class ToyB(DiscreteSoftmax):
        pass

    assert get_head("toy_a") is ToyA and get_head("toy_alias") is ToyA
    assert get_head("toy_b") is ToyB
    assert list_heads("toy_*") == ["toy_a", "toy_b"]
    assert list_heads("toy_?") == ["toy_a", "toy_b"]
    assert list_heads("*_b") == ["toy_b"]
    assert list_heads("soft*") == ["softmax"]
    assert list_heads("nothing*") == []
    assert list_heads() == sorted(list_heads())
    assert isinstance(create_head("toy_alias", channels=1, bins=4), ToyA)


def test_unknown_head_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown head 'softmx'\. Did you mean 'softmax'") as err:
        get_head("softmx")
    assert "Registered heads:" in str(err.value) and "softmax" in str(err.value)
    with pytest.raises(ValueError, match=r"Did you mean 'dlm'"):
        create_head("dml")
    with pytest.raises(ValueError) as err:
        get_head("zzzzzzzz")
    assert "Did you mean" not in str(err.value)
    with pytest.raises(TypeError, match="head name must be a string"):
        get_head(3)


def test_duplicate_names_raise_and_register_nothing(isolated: None) -> None:
    with pytest.raises(ValueError, match="'softmax' is already registered"):
        register_head("softmax")(DiscreteSoftmax)
    with pytest.raises(ValueError, match="'categorical' is already registered .*'softmax'"):
        register_head("fresh", aliases=("categorical",))(DiscreteSoftmax)
    assert "fresh" not in list_heads()  # a failed registration leaves no half entry
    with pytest.raises(TypeError, match="non-empty strings"):
        register_head("")(DiscreteSoftmax)


def test_name_repeated_in_its_own_aliases_raises(isolated: None) -> None:
    with pytest.raises(ValueError, match="'twin'"):
        register_head("twin", aliases=("twin",))(DiscreteSoftmax)


def test_create_head_drops_none(isolated: None) -> None:
    seen = {}

    @register_head("recorder")
    def recorder(**kwargs):
        seen.update(kwargs)
        return DiscreteSoftmax(**kwargs)

    head = create_head("recorder", channels=2, bins=None, in_channels=None)
    assert seen == {"channels": 2}
    assert head.bins == 256 and head.in_channels is None  # the head's own defaults


# -- entry-point plugins ---------------------------------------------------------------------
def _install_fake_plugin(root, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write a plugin module and a dist-info with discretelik.heads entry points under root."""
    (root / "dl_fake_plugin_heads.py").write_text(
        textwrap.dedent(
            """
            from discretelik.heads.softmax import DiscreteSoftmax

            class PluginHead(DiscreteSoftmax):
                '''Registered by entry-point name (no decorator).'''
            """
        )
    )
    (root / "dl_fake_plugin_decorated.py").write_text(
        textwrap.dedent(
            """
            from discretelik import register_head
            from discretelik.heads.softmax import DiscreteSoftmax

            @register_head("plugin_decorated", aliases=("plugin_alias",))
            class DecoratedHead(DiscreteSoftmax):
                '''Registers itself by decorator when its module is imported.'''
            """
        )
    )
    info = root / "dl_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dl-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[discretelik.heads]\n"
        "plugin_head = dl_fake_plugin_heads:PluginHead\n"
        "plugin_decorated = dl_fake_plugin_decorated:DecoratedHead\n"
        "softmax = dl_fake_plugin_heads:PluginHead\n"  # a taken name is skipped, not loaded
    )
    monkeypatch.syspath_prepend(str(root))


def test_entry_point_plugins_load_lazily(isolated: None, tmp_path, monkeypatch) -> None:
    _install_fake_plugin(tmp_path, monkeypatch)
    monkeypatch.setattr(_HEADS, "_entry_points_loaded", False)

    # A hit on a known name does not touch the plugins.
    assert get_head("softmax") is DiscreteSoftmax
    assert not _HEADS._entry_points_loaded
    assert "dl_fake_plugin_heads" not in sys.modules

    # The first miss loads every plugin of the group, once.
    plugin = get_head("plugin_head")
    assert plugin.__module__ == "dl_fake_plugin_heads" and issubclass(plugin, DiscreteSoftmax)
    assert _HEADS._entry_points_loaded
    assert get_head("plugin_decorated").__name__ == "DecoratedHead"
    assert get_head("plugin_alias") is get_head("plugin_decorated")
    assert get_head("softmax") is DiscreteSoftmax  # the plugin did not take a built-in name
    assert {"plugin_head", "plugin_decorated", "softmax"} <= set(list_heads())
    assert list_heads("plugin_*") == ["plugin_decorated", "plugin_head"]

    # A plugin head gets the same contract checks as the built-ins.
    check_head_contract(create_head("plugin_head", channels=2, bins=4))


def test_listing_loads_plugins(isolated: None, tmp_path, monkeypatch) -> None:
    _install_fake_plugin(tmp_path, monkeypatch)
    monkeypatch.setattr(_HEADS, "_entry_points_loaded", False)
    assert "dl_fake_plugin_decorated" not in sys.modules
    assert "plugin_decorated" in list_heads()
    assert "dl_fake_plugin_decorated" in sys.modules


def test_plugins_not_reloaded_once_loaded(isolated: None, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_HEADS, "_entry_points_loaded", True)
    _install_fake_plugin(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="unknown head 'plugin_head'"):
        get_head("plugin_head")
    assert "dl_fake_plugin_heads" not in sys.modules


# -- backbones -------------------------------------------------------------------------------
@dataclass
class ToyConfig:
    in_channels: int = 3
    width: int = 4
    depth: int = 1


class ToyBackbone(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(config.in_channels, config.width, 1)


@pytest.fixture
def toy(isolated: None) -> str:
    presets = {"tiny": {"width": 2}, "big": {"width": 64, "depth": 3}}
    register_backbone("toy", aliases=("toy_alias",), config=ToyConfig, presets=presets)(
        ToyBackbone
    )
    return "toy"


def test_backbone_register_list_and_presets(toy: str) -> None:
    assert get_backbone("toy_alias") is ToyBackbone
    assert "toy" in list_backbones() and list_backbones("to?") == ["toy"]
    assert backbone_presets("toy") == ["big", "tiny"]


def test_backbone_config_layers_preset_then_overrides(toy: str) -> None:
    assert backbone_config("toy") == ToyConfig()
    assert backbone_config("toy", "tiny") == ToyConfig(width=2)
    assert backbone_config("toy", "big", depth=5) == ToyConfig(width=64, depth=5)
    assert backbone_config("toy", "tiny", width=None, depth=None) == ToyConfig(width=2)
    net = create_backbone("toy_alias", preset="tiny", in_channels=1, width=None)
    assert isinstance(net, ToyBackbone) and net.config == ToyConfig(in_channels=1, width=2)
    assert net.conv(torch.zeros(1, 1, 2, 2)).shape == (1, 2, 2, 2)


def test_backbone_errors(toy: str) -> None:
    expected = r"unknown preset 'paper' for backbone 'toy'; expected one of \['big', 'tiny'\]"
    with pytest.raises(ValueError, match=expected):
        backbone_config("toy", "paper")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        create_backbone("toy", preset="huge")
    expected = (
        r"unknown option\(s\) \['widht'\] for backbone 'toy'; "
        r"valid options: \['depth', 'in_channels', 'width'\]"
    )
    with pytest.raises(ValueError, match=expected):
        backbone_config("toy", "tiny", widht=8)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        create_backbone("toy", colour=1)
    with pytest.raises(ValueError, match=r"unknown backbone 'tyo'\. Did you mean 'toy'"):
        create_backbone("tyo")
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_backbone("toy")(ToyBackbone)


def test_backbone_without_config(isolated: None) -> None:
    @register_backbone("plain")
    def plain(width: int = 3) -> nn.Module:
        return nn.Conv2d(1, width, 1)

    assert create_backbone("plain", width=None).out_channels == 3
    assert create_backbone("plain", width=5).out_channels == 5
    with pytest.raises(ValueError, match="backbone 'plain' has no presets; got preset='tiny'"):
        create_backbone("plain", preset="tiny")
    with pytest.raises(ValueError, match="registered without a config class"):
        backbone_config("plain")


def test_isolation_restores_registries() -> None:
    """Runs after the tests above (file order): none of their names remain."""
    names = set(list_heads()) | set(list_backbones())
    assert not names & {"toy_a", "toy_b", "recorder", "toy", "plain", "plugin_head"}
