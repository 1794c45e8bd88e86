"""The command line: `igscale --help/--version`, flags generated from the typed command configs (defaults and help
from the field docstrings), typed values with `none`, one-line errors with exit 2, and `igscale precompute`."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from igscale.cli import main as cli
from igscale.core.cli_args import TypedArgParser, field_docs, parse_value
from igscale.core.typed import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one help line per flag, so the texts can be matched whole


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_describes_every_command_and_imports_no_torch():
    code = ("import sys; from igscale.cli.main import main; rc = main(['--help']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for name in cli.COMMANDS:
        line = next(x for x in p.stdout.splitlines() if x.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10 and "`" not in line, line  # a one-line description
    assert "precompute" in p.stdout and "--version" in p.stdout


def test_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"igscale {version('igscale')}"


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err


@pytest.mark.parametrize("cmd", sorted(cli.COMMANDS))
def test_every_command_has_help(cmd, capsys):
    assert f"igscale {cmd}" in _help(capsys, cmd)


def _typed_commands():
    from data_pipeline.plan import PrecomputeConfig
    from igscale.eval.commands import EvalConfig, ReproduceConfig, SampleConfig, SweepConfig

    return [("sample", SampleConfig), ("sweep", SweepConfig), ("eval", EvalConfig), ("precompute", PrecomputeConfig),
            ("reproduce", ReproduceConfig)]


def _entries(out: str) -> dict[str, str]:
    """{first word of a help entry: the entry's text}; an entry is a line indented by 2 plus its deeper lines."""
    entries, key = {}, None
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            key = line.split()[0]
            entries[key] = line
        elif key and line.startswith("   "):
            entries[key] += " " + line.strip()
        else:
            key = None
    return entries


@pytest.mark.parametrize("cmd, cls", _typed_commands())
def test_generated_help_lists_every_field_with_its_default_and_docstring(cmd, cls, capsys):
    entries = _entries(_help(capsys, cmd))
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = f.name.upper() if (cmd, f.name) in (("eval", "ref"), ("eval", "sample")) else \
            "--" + f.name.replace("_", "-")
        line = entries.get(flag)
        assert line is not None, f"{cmd}: no help entry for {flag}"
        if f.name in docs:
            assert docs[f.name] in line, (flag, line)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert "(required)" in line, line
        elif "default" not in docs.get(f.name, "").lower():
            assert "(default: " in line, line


def test_help_shows_defaults_choices_and_types(capsys):
    out = _help(capsys, "sample")
    assert "--num-samples INT" in out and "(default: 50000)" in out and "Sample i uses seed + i." in out
    assert "--labels {random,balanced}" in out and "--cfg-interval FLOAT FLOAT" in out
    assert "--preset {lightningdit-xl1-ig-cfg-fid1.19," in out and "(--no-batch-invariant: false)" in out
    out = _help(capsys, "sweep")
    assert "(default: 10000)" in out and "--cfg-interval FLOAT,FLOAT [FLOAT,FLOAT ...]" in out
    out = _help(capsys, "precompute")
    assert "usage: igscale precompute" in out and "--samples-per-shard INT" in out
    assert "--executor {ray,inline}" in out and "--config CONFIG" in out


def test_samples_per_shard_none_and_the_other_precompute_flags(tmp_path, capsys):
    from data_pipeline.run import parse_args
    from igscale.cli import precompute

    base = ["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"), "--allow-random-vae"]
    cfg, ns = parse_args(base + ["--samples-per-shard", "none", "--max-workers", "2", "--shard-order", "shuffled"])
    assert cfg.samples_per_shard is None and cfg.max_workers == 2 and cfg.allow_random_vae and ns.executor == "ray"
    (tmp_path / "job.yaml").write_text(f"input: {tmp_path / 'imgs'}\noutput: x\nallow_random_vae: true\n"
                                       "samples_per_shard: 7\nresolution: 128\n")
    cfg, _ = parse_args(["--config", str(tmp_path / "job.yaml"), "--samples-per-shard", "none"])  # flags win
    assert cfg.samples_per_shard is None and cfg.resolution == 128
    # the subcommand runs the job: here it stops at the missing input folder, in one line
    assert precompute.main(base + ["--samples-per-shard", "none", "--executor", "inline"]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd, argv, fragment", [
    ("sample", ["--out", "o", "--num-samples", "many"], "--num-samples: 'many' is not an integer"),
    ("sample", ["--out", "o", "--labels", "all"], "--labels: 'all' is not one of random, balanced"),
    ("sample", ["--out", "o", "--cfg-interval", "0.5", "0.2"], "--cfg-interval must satisfy 0 <= LO <= HI <= 1"),
    ("sample", ["--out", "o", "--w-ig", "nan"], "--w-ig must be finite"),
    ("sample", ["--out", "o", "--num-steps", "0"], "--num-steps must be >= 1"),
    ("sample", ["--out", "o", "--chunk-size", "0"], "chunk_size must be >= 1"),
    ("sample", ["--out", "o", "--batch-invariant", "maybe"], "is not a boolean"),
    ("sample", ["--num-samples", "3"], "missing required --out"),
    ("sample", ["--out", "o", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("sweep", ["--out", "o", "--ref", "r", "--inception", "i", "--w-ig", "1", "x"], "--w-ig: 'x' is not a number"),
    ("sweep", ["--out", "o", "--ref", "r", "--inception", "i", "--ig-interval", "0,1,2"], "expected 2 values"),
    ("sweep", ["--out", "o", "--ref", "r", "--inception", "i", "--eval-batch-size", "0"], "--eval-batch-size"),
    ("eval", ["r.npz", "s.npz", "--inception", "w", "--batch-size", "-1"], "--batch-size and --num-pr-images"),
    ("eval", ["--inception", "w"], "give REF and SAMPLE"),
    ("eval", ["--make-ref", "o.npz", "--inception", "w"], "--make-ref needs --images"),
    ("precompute", ["--input", "i", "--output", "o", "--resolution", "2x"], "--resolution: '2x' is not an integer"),
    ("precompute", ["--input", "i", "--output", "o", "--allow-random-vae", "--max-workers", "0"], "max_workers"),
    ("precompute", ["--input", "i", "--output", "o", "--samples-per-shard", "x"], "is not an integer (or none)"),
])
def test_bad_values_are_one_line_and_exit_2(cmd, argv, fragment, capsys):
    assert cli.main([cmd, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and f"igscale {cmd}: error:" in err, err


def test_bad_value_through_the_entry_point_exits_2():
    p = subprocess.run([sys.executable, "-m", "igscale.cli.main", "sample", "--out", "o", "--seed", "-3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "seed must be >= 0" in p.stderr, p.stderr


def test_parsers_return_typed_configs():
    from igscale.cli import evaluate, sample, sweep

    s = sample.build_parser().parse_args(["--out", "o", "--export", "e", "--cfg-interval", "0,0.7", "--ig-interval",
                                          "0.1", "1", "--w-ig", "1.5", "--batch-invariant", "true"])
    assert (s.cfg_interval, s.ig_interval, s.w_ig, s.batch_invariant) == ((0.0, 0.7), (0.1, 1.0), 1.5, True)
    assert s.generation().batch_invariant and s.w_cfg is None and s.num_samples == 50_000
    w = sweep.build_parser().parse_args(["--out", "o", "--ref", "r", "--inception", "i", "--w-ig", "1.0", "1.4",
                                         "--cfg-interval", "0,0.7", "0,1"])
    assert w.w_ig == [1.0, 1.4] and w.cfg_interval == [(0.0, 0.7), (0.0, 1.0)] and w.w_cfg == []
    e = evaluate.build_parser().parse_args(["ref.npz", "s.npz", "--inception", "w"])
    assert (e.ref, e.sample, e.batch_size, e.out) == ("ref.npz", "s.npz", 64, None)


def test_parse_value_by_type():
    from typing import Literal

    assert parse_value("none", int | None, "--n") is None and parse_value("NULL", str | None, "--s") is None
    assert parse_value("7", int | None, "--n") == 7 and parse_value("none", str, "--s") == "none"
    assert [parse_value(v, bool, "--b") for v in ("true", "no", "1", "OFF")] == [True, False, True, False]
    assert parse_value(["0", "0.5"], tuple[float, float], "--i") == parse_value("0,0.5", tuple[float, float], "--i")
    assert parse_value(["1", "2,3"], tuple[int, ...], "--l") == (1, 2, 3)
    assert parse_value("b", Literal["a", "b"] | None, "--c") == "b"
    with pytest.raises(ConfigError, match=r"^--c: 'z' is not one of a, b \(or none\)$"):
        parse_value("z", Literal["a", "b"] | None, "--c")
    with pytest.raises(ConfigError, match="--f: '1,5' is not a number"):
        parse_value("1,5", float, "--f")


def test_field_docs_and_a_section_without_them():
    @dataclasses.dataclass(kw_only=True)
    class Job:
        """job"""

        steps: int = 3
        """How many steps."""
        rate: float = 0.5
        name: str | None = None

        def __post_init__(self):
            if self.steps < 1:
                raise ValueError("--steps must be >= 1")

    assert field_docs(Job) == {"steps": "How many steps."}
    p = TypedArgParser(Job, prog="job")
    assert p.parse_args(["--rate", "1e-3", "--name", "none"]) == Job(rate=1e-3)
    with pytest.raises(ConfigError, match="--steps must be >= 1"):
        p.parse_args(["--steps", "0"])
    assert "(default: 3)" in p.format_help() and "(default: none)" in p.format_help()


def test_model_field_override_keeps_the_yaml_s_other_model_fields(capsys):
    from igscale.cli.train import main as train_main

    cfg = os.path.join(ROOT, "configs", "lightningdit_xl1_ig.yaml")
    assert train_main(["--config", cfg, "--dry-run", "model.depth=12"]) == 0
    out = capsys.readouterr().out
    assert "depth: 12" in out and "ig_head_init: xavier" in out and "ig_layers:\n  - 8" in out
    assert train_main(["--config", cfg, "--dry-run", "model.overrides.depth=12"]) == 2  # the old spelling
    assert "model.depth=3" in capsys.readouterr().err
