"""imgen: token- and transformer-based text-to-image models, from dataset to metrics."""

__version__ = "0.1.0"
