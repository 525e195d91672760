"""Bundled presets: small overrides of the paper config (demo, tests, GPU quick run)."""

from __future__ import annotations

import sys
from importlib import resources

import yaml

from amoc import config as config_mod
from amoc.errors import ConfigError


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def overrides(name: str) -> dict:
    if name not in available():
        raise ConfigError(f"--preset {name!r}: unknown preset; choose one of {', '.join(available())}")
    return yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text()) or {}


def run(cfg: config_mod.Config, args) -> int:
    """`amoc params`: print (or write) a complete, validated params document."""
    from amoc import io

    raw = config_mod.to_dict(cfg)  # the cli applied the preset (if any) under the --set overrides
    text = yaml.safe_dump(raw, sort_keys=False)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        io.write_text(args.out, text)
    return 0
