"""ZSE runtime: reads `.zse` files and serves the model they hold."""

__version__ = "0.1.0"
