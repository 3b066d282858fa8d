"""The package version, in a module of its own: stages read it here, never from the package root
(which imports every stage)."""
__version__ = "0.1.0"
