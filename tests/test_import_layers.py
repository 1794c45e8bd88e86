"""The math layer (models, diffusion, ops) never imports distributed or IO libraries."""
import ast
import pathlib

FORBIDDEN = {"deepspeed", "ray", "boto3", "botocore", "webdataset", "tensorboard", "torch.distributed", "igscale.io",
             "igscale.distributed", "igscale.training", "igscale.eval", "igscale.cli", "data_pipeline"}
ROOT = pathlib.Path(__file__).resolve().parents[1] / "igscale"


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_math_layer_imports_are_clean():
    bad = []
    files = [p for d in ("models", "diffusion", "ops") for p in (ROOT / d).rglob("*.py")]
    assert len(files) >= 8
    for p in files:
        for mod in _imports(p):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{p.relative_to(ROOT)} imports {mod}")
    diffusion_models = [f"{p.name} imports {m}" for p in (ROOT / "diffusion").rglob("*.py")
                        for m in _imports(p) if m.startswith("igscale.models")]
    assert not bad and not diffusion_models, bad + diffusion_models
