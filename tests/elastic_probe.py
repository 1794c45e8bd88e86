"""Run under torchrun at any world size: resume the latest checkpoint of a run through the trainer's own resume,
then take one step on a fixed batch that every rank shares, and save (rank 0) what the test compares:
the gathered weights and fp32 master weights after the resume, the gathered EMA, and the weights after the step.

    torchrun --nproc_per_node W -m tests.elastic_probe OUT.pt --config C.yaml key=value ...

Every rank uses the same batch and randomness (rank 0's streams), so the averaged gradient is the same at every
world size up to the rounding of the average; the step's difference between world sizes then measures only
whether the optimizer state came through the resume.
"""
from __future__ import annotations

import os
import sys

import torch


def main(argv: list[str]) -> None:
    from igscale.checkpoint.store import Checkpointer
    from igscale.cli.train import make_loader
    from igscale.config.load import load_config
    from igscale.distributed.engine import init_deepspeed_distributed
    from igscale.distributed.env import destroy_distributed, detect_env, device_for, init_distributed
    from igscale.training.build import build_engine
    from igscale.training.loop import Trainer
    from igscale.training.step import train_step

    out, cfg_path, overrides = argv[0], argv[2], argv[3:]
    cfg = load_config(cfg_path, overrides)
    env = init_distributed(detect_env())
    init_deepspeed_distributed()
    device = device_for(env)
    engine, _ = build_engine(cfg, world_size=env.world_size, device=device)
    ckpt = Checkpointer(cfg.checkpoint.url, os.path.join(cfg.run_dir, "probe_staging"), rank=env.rank,
                        world_size=env.world_size, endpoint_url=cfg.data.endpoint_url)
    trainer = Trainer(cfg, engine, make_loader(cfg, env.rank, env.world_size, device), ckpt, None, rank=env.rank,
                      world_size=env.world_size, device=device)
    assert trainer.resume()
    master = {n: engine.gather_shard(n, v) for n, v in engine.param_views()}
    weights = engine.full_state_dict()
    ema = trainer.ema.full_state_dict(engine.gather_shard)
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(4, 4, 8, 8, generator=g), "label": torch.arange(4) % 10}
    engine.set_lr_factor(1.0)
    train_step(engine, [batch], cfg, rank=0, world_size=env.world_size, step=trainer.state.step, device=device)
    after = {n: engine.gather_shard(n, v) for n, v in engine.param_views()}
    if env.rank == 0:
        torch.save({"weights": weights, "master": master, "ema": ema, "after": after, "step": trainer.state.step,
                    "loader": trainer.loader.state_dict()}, out)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
