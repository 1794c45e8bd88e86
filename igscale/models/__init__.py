"""Single-device model math: DiT/SiT and LightningDiT backbones with Internal Guidance heads."""
from igscale.models.config import ModelConfig
from igscale.models.dit import IGDiT
from igscale.models.registry import build_model, build_model_from_config, model_config, model_names

__all__ = ["IGDiT", "ModelConfig", "build_model", "build_model_from_config", "model_config", "model_names"]
