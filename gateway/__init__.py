"""segserve: a job API for semantic segmentation in front of TorchServe."""

__version__ = "0.1.0"
