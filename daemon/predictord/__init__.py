"""predictord: serve Python predictors over HTTP on one machine."""

__version__ = "0.1.0"
