"""``mechscope.settings``: the one config loader (defaults -> TOML -> flags), renamed settings read under their old
names with a warning, nested configs, derived settings, and the TOML writer; on small configs written here."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from mechscope.apps.main_job import MainJobConfig
from mechscope.cooccurrence import ConfigError as CoocConfigError
from mechscope.cooccurrence.config import CoocConfig
from mechscope.dashboards.pipeline import DashboardsConfig
from mechscope.sae.train import TrainConfig
from mechscope.settings import (
    Config,
    ConfigError,
    DeprecatedSetting,
    above,
    add_flags,
    at_least,
    available_devices,
    between,
    check_fields,
    derive,
    device_problem,
    flag_values,
    load,
    meta,
    to_dict,
)


@dataclass
class Inner(Config):
    LABEL: ClassVar[str] = "[inner]."

    size: int = field(default=3, metadata=meta("how many", old="count"))
    fast: bool = field(default=False, metadata=meta("go fast"))

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, 1, "size")


@dataclass
class Outer(Config):
    name: str = field(default="x", metadata=meta("a name", old=("title",)))
    thresholds: list[float] = field(default_factory=lambda: [0.5], metadata=meta("activity thresholds"))
    note: str | None = field(default=None, metadata=meta("a note"))
    inner: Inner = field(
        default_factory=lambda: Inner(size=5), metadata=meta("the inner part", moved={"inner_size": "size"})
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Job(Config):
    """``inner.size`` is the length of ``name``: one owner."""

    name: str = field(default="abc", metadata=meta("a name"))
    inner: Inner = field(default_factory=Inner, metadata=meta("the inner part (its size is the job's)"))

    def __post_init__(self) -> None:
        check_fields(self)
        derive(self)

    def derived(self) -> dict[str, Any]:
        return {"inner.size": len(self.name)}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def _flags(cls: type, argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return flag_values(parser.parse_args(argv), cls)


def test_defaults_then_file_then_flags(tmp_path: Path) -> None:
    assert load(Outer) == Outer() == Outer(inner=Inner(size=5))
    path = _toml(tmp_path, 'name = "file"\nthresholds = [1, 2.5]\n[inner]\nfast = true\n')
    assert load(Outer, path) == Outer(name="file", thresholds=[1, 2.5], inner=Inner(size=5, fast=True))
    given = _flags(Outer, ["--name", "flag", "--inner.size", "7", "--inner.no-fast"])
    assert given == {"name": "flag", "inner.size": 7, "inner.fast": False}  # flags not given are left out
    assert load(Outer, path, given) == Outer(name="flag", thresholds=[1, 2.5], inner=Inner(size=7, fast=False))
    assert _flags(Outer, ["--thresholds", "1", "0.5"]) == {"thresholds": [1, 0.5]}  # "1" reads as TOML's 1 does


def test_a_renamed_field_is_read_under_its_old_key_and_flag_with_a_warning(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'title = "old"\n[inner]\ncount = 2\n')
    with pytest.warns(DeprecatedSetting) as caught:
        config = load(Outer, path)
    assert config == Outer(name="old", inner=Inner(size=2))
    assert [str(w.message) for w in caught] == [
        f"{path}: title is deprecated: use name",
        f"{path}: [inner].count is deprecated: use [inner].size",
    ]
    with pytest.warns(DeprecatedSetting, match=re.escape("--inner.count is deprecated: use --inner.size")):
        assert _flags(Outer, ["--inner.count", "4"]) == {"inner.size": 4}
    with pytest.warns(DeprecatedSetting, match="title is deprecated: use name"):
        assert Outer.from_toml(_toml(tmp_path, ""), title="python") == Outer(name="python")
    path = _toml(tmp_path, 'title = "old"\nname = "new"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: both title and name are given")):
        load(Outer, path)


def test_a_setting_moved_into_a_nested_config_keeps_its_old_key_and_flag(tmp_path: Path) -> None:
    with pytest.warns(DeprecatedSetting, match=re.escape("inner_size is deprecated: use [inner].size")):
        assert load(Outer, _toml(tmp_path, "inner_size = 9\n")).inner.size == 9
    with pytest.warns(DeprecatedSetting, match=re.escape("--inner-size is deprecated: use --inner.size")):
        assert _flags(Outer, ["--inner-size", "6"]) == {"inner.size": 6}


def test_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    cases = {
        "[inner]\nsize = 0\n": "[inner].size must be at least 1, got 0",
        '[inner]\nsize = "3"\n': "[inner].size must be int, got '3'",
        "[inner]\nsizes = 3\n": "unknown key [inner].sizes in [inner]; did you mean [inner].size?",
        "nam = 3\n": "unknown key nam in top level; did you mean name?",
        "inner = 3\n": "[inner] must be a table, got 3",
        "thresholds = 0.5\n": "thresholds must be list[float], got 0.5",
    }
    for text, message in cases.items():
        path = _toml(tmp_path, text)
        with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")) as error:
            load(Outer, path)
        assert isinstance(error.value, ValueError)
    assert error.value.field == "thresholds"
    path = _toml(tmp_path, 'name = "file"\n')
    with pytest.raises(ConfigError, match=r"^\[inner\].size must be at least 1, got 0$") as error:
        load(Outer, path, {"inner.size": 0})  # a bad flag is not blamed on the file
    assert error.value.field == "inner.size"
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid TOML")):
        load(Outer, _toml(tmp_path, "name = \n"))
    assert ConfigError is CoocConfigError  # one error type, still importable from mechscope.cooccurrence


def test_derived_settings_have_one_owner(tmp_path: Path) -> None:
    assert Job(name="abcd").inner.size == 4
    assert Job(name="ab", inner=Inner(size=9, fast=True)).inner == Inner(size=2, fast=True)
    assert "inner.size" not in _flag_dests(Job) and "inner.fast" in _flag_dests(Job)
    path = _toml(tmp_path, "[inner]\nsize = 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [inner].size is set by Job from its own settings")):
        load(Job, path)
    assert to_dict(Job(name="abcd", inner=Inner(fast=True))) == {"name": "abcd", "inner": {"fast": True}}


def _flag_dests(cls: type) -> set[str]:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return {action.dest for action in parser._actions}


def test_written_toml_reads_back_equal(tmp_path: Path) -> None:
    config = Outer(name='q "x" \\ \x7f\x01 é', thresholds=[0, 1e-5], inner=Inner(size=2, fast=True))
    path = config.to_toml(tmp_path / "out.toml")
    assert load(Outer, path) == config
    assert "note" not in path.read_text(encoding="utf-8")  # None: left out, it is the default
    job = load(MainJobConfig, overrides={"top_k": 3, "train.k": 16, "cooc.counting.n_batches": 8})
    assert load(MainJobConfig, job.to_toml(tmp_path / "job.toml")) == job


def test_every_package_config_has_a_flag_with_help_per_setting() -> None:
    for cls in (TrainConfig, CoocConfig, MainJobConfig):
        parser = argparse.ArgumentParser()
        add_flags(parser, cls)
        flags = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]
        assert flags and all(a.help and "(default: " in a.help for a in flags), cls

    @dataclass
    class NoHelp(Config):
        size: int = 3

    with pytest.raises(TypeError, match=r"NoHelp.size has no help: declare it with metadata=meta"):
        add_flags(argparse.ArgumentParser(), NoHelp)


@pytest.mark.parametrize(
    ("path", "text", "message"),
    [
        ("cooc.toml", '[counting]\nmodel = "m"\nsae = "s"\ndevice = "cuda:7"\n', "[counting].device 'cuda:7' is not"),
        ("cooc.toml", '[counting]\nmodel = "m"\nsae = "s"\nn_batches = nan\n', "[counting].n_batches must be int"),
        ("dash.toml", 'sae = "s"\ncheckpoint_seconds = nan\n', "checkpoint_seconds must be a finite number at least 0"),
        ("dash.toml", 'sae = "s"\ncheckpoint_seconds = -1.0\n', "checkpoint_seconds must be at least 0, got -1.0"),
        ("dash.toml", 'sae = "s"\ndevice = "foo"\n', "device 'foo' is not a torch device: use one of cpu"),
        ("job.toml", "[train]\nlr = inf\n", "TrainConfig.lr must be a finite number greater than 0, got inf"),
        ("job.toml", '[dashboards]\ndevice = "mps:3"\n', "device 'mps:3' is not"),
    ],
)
def test_every_config_refuses_nan_negative_and_missing_devices_the_same_way(
    tmp_path: Path, path: str, text: str, message: str
) -> None:
    cls = {"cooc.toml": CoocConfig, "dash.toml": DashboardsConfig, "job.toml": MainJobConfig}[path]
    file = tmp_path / path
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(cls, file)
    assert str(caught.value).startswith(f"{file}: {message}")


def test_the_number_checks_refuse_nan_and_inf_and_skip_unset_fields() -> None:
    @dataclass
    class Numbers(Config):
        rate: float | None = field(default=None, metadata=meta("a rate"))

    for value, check, message in [
        (math.nan, lambda c: at_least(c, 0, "rate"), "rate must be a finite number at least 0, got nan"),
        (-math.inf, lambda c: above(c, 0, "rate"), "rate must be a finite number greater than 0, got -inf"),
        (1.0, lambda c: between(c, 0, 1, "rate", high_open=True), "rate must be in [0, 1), got 1.0"),
        (0.0, lambda c: above(c, 0, "rate"), "rate must be greater than 0, got 0.0"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            check(Numbers(rate=value))
    for check in (lambda c: at_least(c, 0, "rate"), lambda c: above(c, 0, "rate"), lambda c: between(c, 0, 1, "rate")):
        check(Numbers())  # None: not set, nothing to check
    assert device_problem("cpu") is None and device_problem("cpu:0") is None
    assert device_problem("meta") == f"'meta' is not available on this machine (torch {torch.__version__} sees no " + (
        f"meta device): use one of {', '.join(available_devices())}"
    )
