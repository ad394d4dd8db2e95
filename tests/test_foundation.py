"""The shared plumbing: strict configs, the registry, the canonical schema helpers, the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from trace_ray.cli import main
from trace_ray.config import ConfigError, from_dict, load_config, parse_overrides
from trace_ray.data.schema import categorize, row_id
from trace_ray.registry import Registry


@dataclass
class Inner:
    lr: float = 1e-4
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    note: Optional[str] = None

    def validate(self):
        if self.steps <= 0:
            raise ConfigError("steps: must be positive")


def test_config_strict_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  lr: 1e-3\n")
    cfg = load_config(Outer, p, ["inner.mode=b", "steps=3", "tags=[u, v]"])
    assert cfg.inner.lr == pytest.approx(1e-3) and cfg.inner.mode == "b"
    assert cfg.steps == 3 and cfg.tags == ["u", "v"]
    with pytest.raises(ConfigError, match=r"inner\.lrr: unknown key; valid keys here: lr, mode"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"inner\.mode: 'c' is not one of 'a', 'b'"):
        from_dict(Outer, {"name": "x", "inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"steps: expected an integer"):
        from_dict(Outer, {"name": "x", "steps": "many"})
    with pytest.raises(ConfigError, match=r"name: required field is missing"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match=r"steps: must be positive"):
        from_dict(Outer, {"name": "x", "steps": 0})
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["steps"])


def test_config_bad_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ninner: [1,\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(Outer, p)


def test_registry_is_strict():
    reg: Registry = Registry("oracle")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)
    with pytest.raises(KeyError, match="valid: a"):
        reg.get("b")


def test_row_id_stable_and_categories():
    assert row_id("p", "c", "r") == row_id("p", "c", "r")
    assert row_id("p", "c", "r") != row_id("p", "r", "c")
    assert row_id("ab", "c", "r") != row_id("a", "bc", "r")
    assert categorize("non_compliant", "compliant") == "invert"
    assert categorize("non_compliant", "non_compliant") == "punish"
    assert categorize("compliant", "non_compliant") == "retain"
    assert categorize("compliant", "error") == "retain"
    assert categorize("non_compliant", "error") == "unresolved"
    assert categorize("error", "compliant") == "unresolved"


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "trace-ray" in capsys.readouterr().out
