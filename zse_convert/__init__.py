"""ZSE converter: Hugging Face checkpoint -> one INT4 `.zse` file."""

from zse_runtime import __version__

__all__ = ["__version__"]
