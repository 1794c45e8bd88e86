"""igscale: distributed training and evaluation of diffusion transformers with Internal Guidance."""
__version__ = "0.1.0"
