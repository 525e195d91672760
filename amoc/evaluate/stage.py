"""`amoc evaluate [--corruptions DIR]`: one stage, two kinds of test images."""

from __future__ import annotations

import argparse

from amoc.config import Config
from amoc.evaluate import attacks, corruptions


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Corrupted test sets when --corruptions is given, else attacks on the clean test set."""
    if args.corruptions:
        return corruptions.run(cfg, args)
    return attacks.run(cfg, args)
