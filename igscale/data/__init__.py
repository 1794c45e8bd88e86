"""Image preprocessing shared by the latent pipeline and evaluation."""
from igscale.data.crop import center_crop_adm

__all__ = ["center_crop_adm"]
