"""Bad input is refused with one named line before any process group starts (issue 14, items 10, 11, 13)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igscale.config.load import load_config
from igscale.core.typed import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def test_model_fields_merge_field_by_field(tmp_path):
    cfg = load_config(TINY, ["model.depth=2"])
    assert cfg.model.arch_overrides() == {"input_size": 8, "in_channels": 4, "hidden_size": 64, "depth": 2,
                                          "num_heads": 2, "num_classes": 10, "ig_layers": (2,)}
    ldit = load_config(os.path.join(ROOT, "configs", "lightningdit_xl1_ig.yaml"), ["model.depth=12"])
    assert ldit.model.ig_head_init == "xavier" and ldit.model.depth == 12 and ldit.model.ig_layers == (8,)
    child = tmp_path / "child.yaml"  # a `base:` child that sets one model field keeps the parent's others
    child.write_text(f"base: {TINY}\nmodel:\n  depth: 3\n")
    assert load_config(str(child)).model.hidden_size == 64 and load_config(str(child)).model.depth == 3


@pytest.mark.parametrize("override,field", [
    ("logging.every_steps=0", "every_steps"), ("sample.every_steps=-1", "every_steps"), ("sample.num=-3", "num"),
    ("sample.num_steps=0", "num_steps"), ("train.max_nonfinite=-1", "max_nonfinite"), ("sample.w_ig=.nan", "finite"),
])
def test_ranges_are_checked_at_load(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(TINY, [override])


def test_empty_broken_and_binary_config_files(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("model: {name: SiT-S/2\ntrain: [1, 2\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is empty"):
        load_config(str(tmp_path / "empty.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(str(tmp_path / "binary.yaml"))
    # the CLI turns each into exit code 2 and one line, no traceback
    p = subprocess.run([sys.executable, "-m", "igscale.cli.main", "train", "--config", str(tmp_path / "broken.yaml"),
                        "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "invalid YAML" in p.stderr, p.stderr


def test_nan_guidance_weight_is_refused():
    from igscale.diffusion.guidance import GuidanceConfig

    with pytest.raises(ValueError, match="finite"):
        GuidanceConfig(w_ig=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        GuidanceConfig(w_cfg=float("inf"))


def test_s3_client_errors_are_user_errors():
    from botocore.exceptions import ClientError, NoCredentialsError

    from igscale.cli.common import USER_ERRORS

    assert issubclass(ClientError, USER_ERRORS) and issubclass(NoCredentialsError, USER_ERRORS)


def test_precompute_flags_and_inputs_fail_with_one_line(tmp_path, capsys, caplog):
    from data_pipeline.plan import list_images
    from data_pipeline.run import main, parse_args

    base = ["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"), "--allow-random-vae", "true"]
    cfg, _ = parse_args(base + ["--samples-per-shard", "none", "--resolution", "64"])
    assert cfg.samples_per_shard is None and cfg.resolution == 64
    with pytest.raises(ConfigError, match="--resolution: '2x' is not an integer"):
        parse_args(base + ["--resolution", "2x"])
    assert main(base + ["--executor", "inline"]) == 2  # missing input folder
    err = capsys.readouterr().err
    assert "precompute: error:" in err and "no images found" in err and "Traceback" not in err
    root = tmp_path / "imgs"
    for d in ("a", "b", "c"):
        (root / d).mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"")
    (root / "c" / "y.png").write_bytes(b"")
    with caplog.at_level("WARNING"):
        src = list_images(str(root))
    assert src.classes == ["a", "b", "c"] and src.labels == [0, 2]  # c keeps index 2 although b is empty
    assert "b (class 1)" in caplog.text
    (root / "top.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="directly under"):
        list_images(str(root))


def test_export_without_checkpoint_or_with_a_bad_tag(tmp_path, capsys):
    from igscale.cli.export import main

    assert main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "ex")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "none"), "--tag", "../../etc", "--out", str(tmp_path / "ex")]) == 2
    assert "not a checkpoint tag" in capsys.readouterr().err
