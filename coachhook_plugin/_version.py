"""The package version, in a leaf module: the package `__init__` and the state files (`persistence`) read it."""
__version__ = "0.1.0"
