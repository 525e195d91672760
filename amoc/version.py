"""The package version, written into every output file that records provenance."""

__version__ = "0.1.0"
