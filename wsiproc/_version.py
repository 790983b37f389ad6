"""The package version, in a module of its own so that every layer can name it without importing the package
root (whose public API sits above all of them)."""

__version__ = "0.1.0"
