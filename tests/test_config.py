"""RunConfig: YAML + typed dotted overrides, rejection of unknown keys / wrong types, recipes, resolved-config save."""
import glob
import os

import pytest

from igscale.cli.train import main as train_main
from igscale.config.load import load_config, parse_overrides, save_config
from igscale.config.schema import RunConfig
from igscale.core.typed import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.engine.grad_clip == 1.0


def test_official_recipes():
    sit = load_config(os.path.join(CONFIGS, "sit_xl2_ig.yaml"))
    assert (sit.model.name, sit.optim.name, sit.optim.lr, sit.optim.betas) == ("SiT-XL/2", "adamw", 1e-4, (0.9, 0.999))
    assert (sit.train.global_batch, sit.train.ema_decay, sit.loss.aux_weight) == (256, 0.9999, 0.5)
    assert sit.model.ig_layers == (8,) and sit.model.depth is None and sit.train.epochs == 800
    assert sit.model.resolve().depth == 28  # unset fields take the registry preset's value
    ldit = load_config(os.path.join(CONFIGS, "lightningdit_xl1_ig.yaml"))
    assert ldit.optim.name == "muon" and ldit.optim.muon_lr == 2e-4 and ldit.optim.muon_weight_decay == 0.01
    assert ldit.optim.betas == (0.9, 0.95) and ldit.loss.cosine_loss and ldit.engine.zero_stage == 2
    for name in ("sit_b2_ig", "sit_l2_ig"):  # derived from the same base recipe
        c = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
        assert c.optim == sit.optim and c.train == sit.train


def test_typed_overrides_apply_and_coerce():
    cfg = load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"),
                      ["train.global_batch=32", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "engine.zero_stage=3",
                       "data.endpoint_url=null", "model.depth=2", "model.ig_layers=[1]"])
    assert cfg.train.global_batch == 32 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.engine.zero_stage == 3 and cfg.data.endpoint_url is None and cfg.model.depth == 2
    assert cfg.model.ig_layers == (1,) and cfg.model.arch_overrides()["hidden_size"] == 64
    assert parse_overrides(["a.b.c=true", "x=1"]) == {"a": {"b": {"c": True}}, "x": 1}


@pytest.mark.parametrize("override, fragment", [
    ("train.global_bach=32", "global_bach"),             # typo in a key
    ("trian.seed=1", "trian"),                           # typo in a section
    ("train.global_batch=many", "train.global_batch"),   # wrong type
    ("engine.zero_stage=1.5", "engine.zero_stage"),
    ("engine.precision=fp8", "engine.precision"),
    ("engine.zero_stage=4", "zero_stage"),               # range check in __post_init__
    ("model.depth=1", "model: ig_layer 2"),              # ig_layers [2] out of range for depth 1
    ("model.depth=x", "model.depth: expected int"),
    ("model.norm=batchnorm", "model.norm"),
    ("model.overrides.depth=3", "model.depth=3"),        # the old untyped dict: says where its keys went
    ("loss.t_std=0", "t_std"),
    ("optim.betas=[0.9, 1.5]", "betas"),
    ("train.seed=-1", "seed"),
    ("model.name=SiT-XXL/2", "SiT-XXL/2"),
    ("train.seed", "key=value"),
])
def test_bad_config_is_rejected_with_the_path(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), [override])
    assert fragment in str(e.value)


def test_muon_allowed_at_every_stage_with_fp32_weights():
    for stage in (0, 1, 2, 3):
        cfg = load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), ["optim.name=muon", f"engine.zero_stage={stage}"])
        assert cfg.optim.name == "muon" and cfg.engine.zero_stage == stage
    with pytest.raises(ConfigError, match="bf16_autocast"):
        load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), ["optim.name=muon", "engine.zero_stage=0",
                                                             "engine.precision=bf16"])
    assert load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), ["optim.name=muon", "engine.zero_stage=1"])
    with pytest.raises(ConfigError, match="offload_optimizer=false"):
        load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), ["optim.name=muon", "engine.zero_stage=1",
                                                             "engine.offload_optimizer=true"])


def test_micro_batch_must_divide():
    cfg = load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), ["train.global_batch=10", "engine.grad_accum=2"])
    assert cfg.micro_batch(1) == 5
    with pytest.raises(ValueError, match="not divisible"):
        cfg.micro_batch(2)


def test_resolved_config_roundtrip(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "lightningdit_xl1_ig.yaml"), ["train.seed=7"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_cli_dry_run_and_rejection(capsys):
    assert train_main(["--config", os.path.join(CONFIGS, "tiny_cpu.yaml"), "--dry-run", "train.seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out
    assert train_main(["--config", os.path.join(CONFIGS, "tiny_cpu.yaml"), "--dry-run", "train.sed=5"]) == 2
    assert "sed" in capsys.readouterr().err
    # an empty manifest is caught before any process group or worker starts
    assert train_main(["--config", os.path.join(CONFIGS, "tiny_cpu.yaml")]) == 2


def test_model_section_mirrors_model_config():
    """Every ModelConfig field but name/extra is a ModelSection field of the same type or None (= the preset's)."""
    import dataclasses
    import typing

    from igscale.config.schema import MODEL_ARCH_FIELDS, ModelSection
    from igscale.models import ModelConfig

    cfg_hints, sec_hints = typing.get_type_hints(ModelConfig), typing.get_type_hints(ModelSection)
    arch = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "extra")]
    assert list(MODEL_ARCH_FIELDS) == arch
    for name in arch:
        assert sec_hints[name] == cfg_hints[name] | None, name
        assert getattr(ModelSection(), name) is None
