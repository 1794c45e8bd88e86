"""TrainState: the counters that define where a run is. Progress is counted in optimizer steps and images."""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TrainState"]


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed (skipped non-finite steps included: the data they drew is consumed)."""
    nimg: int = 0
    """Training images consumed across all ranks."""
    nonfinite: int = 0
    """Steps whose loss was NaN/Inf on some rank."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.nimg, self.nonfinite = int(d["step"]), int(d["nimg"]), int(d["nonfinite"])
