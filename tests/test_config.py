"""Params validation: the paper defaults, overrides, and every documented bad input."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest
import yaml
from conftest import REPO

from amoc import cli, config, presets
from amoc.errors import ConfigError

TABLE = REPO / "docs" / "bad-params.md"
ROW = re.compile(r"^\| (\d+) \| `(.+)` \| `(.+)` \|$")


def _rows() -> list[tuple[str, str, str]]:
    rows = [m.groups() for line in TABLE.read_text().splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 15, "the docs table must keep at least 15 cases"
    return rows


def test_params_yaml_is_the_paper_config():
    assert config.load(REPO / "params.yaml") == config.Config()
    cfg = config.Config()
    assert (cfg.variant, cfg.queue_size, cfg.leverage, cfg.seed) == ("ACA+", 32768, 0.5, 1)
    assert cfg.pretrain.attack.eps == pytest.approx(8 / 255)
    assert cfg.pretrain.attack.step_size == pytest.approx(2 / 255)
    assert (cfg.pretrain.epochs, cfg.pretrain.batch_size, cfg.pretrain.lr) == (200, 256, 0.1)
    assert cfg.evaluate.pgd.steps == 20 and cfg.probe.attack.steps == 10


def test_sweep_knobs_are_top_level():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for knob in ("variant", "queue_size", "leverage", "seed"):
        assert knob in raw


@pytest.mark.parametrize("spelling", ["ACA+", "aca+", "ACA_PLUS", "aca_plus"])
def test_aca_plus_spellings(spelling):
    assert config.load(REPO / "params.yaml", [f"variant={spelling}"]).variant == "ACA+"


@pytest.mark.parametrize("variant", config.VARIANTS)
def test_every_variant_is_valid(variant):
    assert config.load(REPO / "params.yaml", [f"variant={variant}"]).variant == variant


def test_overrides_keep_types_and_fractions():
    cfg = config.load(
        REPO / "params.yaml",
        ["queue_size=4096", "pretrain.attack.eps=4/255", "probe.milestones=[5, 7]", "runtime.compile=true"],
    )
    assert cfg.queue_size == 4096 and isinstance(cfg.queue_size, int)
    assert cfg.pretrain.attack.eps == pytest.approx(4 / 255)
    assert cfg.probe.milestones == [5, 7]
    assert cfg.runtime.compile is True
    assert cfg.queue_size_adv == 4096  # K2 follows K1 unless set


def test_config_is_frozen():
    cfg = config.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.queue_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("preset", ["demo", "tiny", "quick", "authors-table", "acl", "rocl", "dynacl"])
def test_presets_validate(preset, tmp_path):
    out = tmp_path / "p.yaml"
    assert cli.main(["params", "--params", str(REPO / "params.yaml"), "--preset", preset, "--out", str(out)]) == 0
    assert isinstance(config.load(out), config.Config)


def test_set_wins_over_the_preset(tmp_path):
    out = tmp_path / "p.yaml"
    assert (
        cli.main(
            [
                "params",
                "--params",
                str(REPO / "params.yaml"),
                "--preset",
                "tiny",
                "--set",
                "pretrain.epochs=7",
                "--set",
                "seed=3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cfg = config.load(out)
    assert (cfg.pretrain.epochs, cfg.seed, cfg.data.name) == (7, 3, "digits")  # the rest is the preset's


def test_defaults_follow_the_authors_recipe_and_the_table_preset_their_early_table(tmp_path):
    """params.yaml: the authors' later TRADES recipe, their enqueue order, blur and TRADES
    start; `authors-table`: the PGD-AT protocol behind their early table."""
    cfg = config.load(REPO / "params.yaml")
    assert cfg.pretrain.enqueue_order == "authors" and cfg.pretrain.augment.blur_kernel == 0
    assert cfg.probe.loss == cfg.finetune.loss == "trades" and cfg.finetune.trades_start == "uniform"
    assert (cfg.finetune.epochs, cfg.finetune.milestones) == (100, [40, 60])
    out = tmp_path / "table.yaml"
    assert (
        cli.main(["params", "--params", str(REPO / "params.yaml"), "--preset", "authors-table", "--out", str(out)]) == 0
    )
    table = config.load(out)
    assert table.probe.loss == table.finetune.loss == "pgd_at"
    assert (table.probe.epochs, table.probe.milestones) == (25, [15, 20])
    assert (table.finetune.epochs, table.finetune.milestones) == (40, [30, 35])
    assert table.evaluate.pgd.step_ratio == pytest.approx(0.1) and table.pretrain == cfg.pretrain
    assert table.probe.val_images == table.finetune.val_images == 0  # they train on every image


@pytest.mark.parametrize("number,args,expected", _rows(), ids=[r[0] for r in _rows()])
def test_documented_bad_params(number, args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    huge = tmp_path / "huge.yaml"
    huge.write_text("a" * 2_000_000)
    argv = [a.replace("{HUGE}", str(huge)) for a in shlex.split(args)]
    out = tmp_path / "out"
    status = cli.main(["download", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip().replace(str(huge), "{HUGE}")
    assert status == 2
    assert err == expected
    assert len(err.splitlines()) == 1
    assert not out.exists(), "a rejected params file must not create outputs"


def test_parse_override_rejects_empty_key():
    with pytest.raises(ConfigError, match="dotted key"):
        config.parse_override("pretrain..epochs=3")


def test_text_overrides_keep_what_was_typed():
    cfg = config.load(REPO / "params.yaml", ["data.md5=00000000000000000000000000000000", "data.source=123"])
    assert cfg.data.md5 == "0" * 32
    assert cfg.data.source == "123"


@pytest.mark.parametrize("typed,expected", [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_on_off_survive_yaml_booleans(typed, expected):
    assert config.load(REPO / "params.yaml", [f"runtime.channels_last={typed}"]).runtime.channels_last == expected


def test_params_from_nothing_come_from_the_package(tmp_path, monkeypatch, capsys):
    """`amoc params --preset demo --out params.yaml` in an empty folder: the package's
    defaults (what params.yaml restates) with the preset on top; an explicit --params
    that does not exist is still an error."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["params", "--preset", "demo", "--out", "params.yaml", "--set", "seed=3"]) == 0
    assert "starting from the package's defaults" in capsys.readouterr().err
    expected = config.load(REPO / "params.yaml", ["seed=3"], preset=presets.overrides("demo"))
    assert config.load(tmp_path / "params.yaml") == expected
    assert cli.main(["params", "--params", "missing.yaml"]) == 2
    assert "missing.yaml: params file not found" in capsys.readouterr().err
