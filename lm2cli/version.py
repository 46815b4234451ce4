"""The lm2 version: a bottom-layer module, so any module may import it without importing the package's exports."""

__version__ = "0.1.0"
