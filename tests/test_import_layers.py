"""Arrows only point down: every igscale package sits in one layer and imports only from its own or lower layers.

The layers (docs/architecture.md has the table):
    core       typed config machinery, seeding                        (imports no other igscale package)
    math       ops, models, diffusion: single-device torch            (no distributed or IO library)
    config     the run/command config schemas
    adapters   storage, latents, checkpoint, distributed, monitor, vae: thin wrappers of the real libraries
    workflows  training, eval
    entry      cli, demo, data_pipeline
Inside a layer, packages must not import each other in a cycle. The checker is also run on a copy of the tree with
planted upward imports, so this test is known to fail when an arrow turns around.
"""
from __future__ import annotations

import ast
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = [
    ("core", {"igscale.core"}),
    ("math", {"igscale.ops", "igscale.models", "igscale.diffusion"}),
    ("config", {"igscale.config"}),
    ("adapters", {"igscale.storage", "igscale.latents", "igscale.checkpoint", "igscale.distributed",
                  "igscale.monitor", "igscale.vae"}),
    ("workflows", {"igscale.training", "igscale.eval"}),
    ("entry", {"igscale.cli", "igscale.demo", "data_pipeline"}),
]
LAYER_OF = {pkg: i for i, (_, pkgs) in enumerate(LAYERS) for pkg in pkgs}
MATH_FORBIDDEN = ("deepspeed", "ray", "boto3", "botocore", "webdataset", "tensorboard", "torch.distributed",
                  "diffusers")


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "data_pipeline":
        return "data_pipeline"
    if parts[0] != "igscale" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def violations(root: pathlib.Path) -> list[str]:
    bad: list[str] = []
    edges: dict[str, set[str]] = {}
    files = [p for d in ("igscale", "data_pipeline") for p in (root / d).rglob("*.py")]
    for p in files:
        rel = p.relative_to(root)
        if rel.parts[-1] == "__init__.py" and len(rel.parts) == 2:  # igscale/__init__.py, data_pipeline/__init__.py
            continue
        here = _package(".".join(rel.with_suffix("").parts))
        if here not in LAYER_OF:
            bad.append(f"{rel}: package {here} is in no layer (add it to the table)")
            continue
        for mod in _imports(p):
            there = _package(mod)
            if LAYER_OF[here] == 1 and any(mod == f or mod.startswith(f + ".") for f in MATH_FORBIDDEN):
                bad.append(f"{rel}: the math layer imports {mod}")
            if there is None or there == here:
                continue
            if there not in LAYER_OF:
                bad.append(f"{rel}: imports {mod}, which is in no layer")
            elif LAYER_OF[there] > LAYER_OF[here]:
                bad.append(f"{rel}: {LAYERS[LAYER_OF[here]][0]} imports {mod} from the higher "
                           f"{LAYERS[LAYER_OF[there]][0]} layer")
            elif here == "igscale.diffusion" and there == "igscale.models":
                bad.append(f"{rel}: diffusion imports {mod}; the sampler and losses take any callable model")
            else:
                edges.setdefault(here, set()).add(there)
    bad += [f"import cycle between packages: {' -> '.join(c)}" for c in _cycles(edges)]
    return bad


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                found.append(path[path.index(m):] + [m] if m in path else [n, m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    return found


def test_every_arrow_points_down():
    assert violations(ROOT) == []


def test_the_checker_fails_on_planted_upward_imports(tmp_path):
    for d in ("igscale", "data_pipeline"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    plants = {
        "igscale/latents/loader.py": "from igscale.training.loop import Trainer\n",  # adapters -> workflows
        "igscale/core/typed.py": "import igscale.models\n",  # core -> math
        "igscale/models/dit.py": "import deepspeed\n",  # a distributed library in the math layer
        "igscale/storage/base.py": "from igscale.latents.format import MANIFEST\n",  # storage <-> latents cycle
        "data_pipeline/plan.py": "from igscale.demo.toy import make_images\n",  # demo imports data_pipeline too
    }
    for rel, line in plants.items():
        p = tmp_path / rel
        p.write_text(line + p.read_text())
    (tmp_path / "igscale" / "io").mkdir()
    (tmp_path / "igscale" / "io" / "misc.py").write_text("X = 1\n")
    found = "\n".join(violations(tmp_path))
    for needle in ("adapters imports igscale.training.loop", "core imports igscale.models",
                   "math layer imports deepspeed", "package igscale.io is in no layer",
                   "cycle between packages"):
        assert needle in found, found
    cycles = [line for line in found.splitlines() if "cycle" in line]
    assert any("igscale.storage" in c and "igscale.latents" in c for c in cycles), cycles
    assert any("data_pipeline" in c and "igscale.demo" in c for c in cycles), cycles


def test_math_modules_declare_their_public_names():
    import importlib

    missing, unknown = [], []
    for d in ("models", "diffusion", "ops"):
        for p in sorted((ROOT / "igscale" / d).glob("*.py")):
            if p.name == "__init__.py":
                continue
            mod = importlib.import_module(f"igscale.{d}.{p.stem}")
            names = getattr(mod, "__all__", None)
            if names is None:
                missing.append(p.name)
            else:
                unknown += [f"{p.name}:{n}" for n in names if not hasattr(mod, n)]
    assert not missing and not unknown, (missing, unknown)
