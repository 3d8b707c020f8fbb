"""cmdfed: federated and edge toolkit for CMD (ConvNeXt Masked-Diffusion)."""

__version__ = "0.1.0"
