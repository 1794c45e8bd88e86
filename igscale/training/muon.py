"""Muon (momentum + Newton-Schulz orthogonalisation) for >=2-D weights, with Adam for everything else.

The update of the official LightningDiT+IG optimizer ("MuonWithAuxAdam"), including its stacked LR scaling
(steps 4 and 5 both scale by the shape):
  1. G: grad flattened to 2-D, rows = dim 0.   2. m <- lerp(m, G, 1-beta); U = lerp(G, m, beta) (Nesterov).
  3. U <- NS5(U / (||U||_F + 1e-7)) with (a, b, c) = (3.4445, -4.7750, 2.0315), in bf16, on the wide orientation.
  4. U <- U * sqrt(max(1, rows/cols)).        5. step = lr * 0.2 * sqrt(max(shape[0], shape[1])).
  6. p <- p * (1 - lr*wd) - step * U          (decoupled weight decay with the unadjusted lr).
The matrix math needs each parameter's whole gradient, so this optimizer runs on real parameters (ZeRO-0).
The sharded forms (muon_sharded.py for ZeRO-1, muon_zero.py for ZeRO-2/3) run this same code on whole tensors.
Gradient clipping by the global norm is done here, not by DeepSpeed: the norm is taken from one 2-norm per whole
gradient in a fixed order, which every ZeRO stage can reproduce bitwise (DeepSpeed's partitioned norms sum in a
stage-dependent order, and Newton-Schulz in bf16 magnifies a last-bit difference of its input).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from igscale.core.typed import ConfigError

__all__ = ["MuonWithAdam", "newton_schulz5", "muon_param_groups", "MuonGuard", "NotMuonError", "grad_norms",
           "clip_coef"]

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the orthogonal factor U·Vᵀ of G (R, K) with quintic Newton-Schulz iterations."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    X = X / (X.norm() + 1e-7)
    transpose = X.shape[0] > X.shape[1]
    if transpose:  # iterate on the wide orientation so X·Xᵀ is the small Gram matrix
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT  # (R', R')
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transpose else X


def muon_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], *, muon_lr: float, muon_wd: float,
                      momentum: float, ns_steps: int, adam_lr: float, betas: tuple[float, float], eps: float,
                      adam_wd: float) -> list[dict]:
    """Trainable params with ndim >= 2 -> Muon group; the rest (biases, norm weights) -> Adam group.

    Frozen parameters (e.g. the sin-cos pos_embed) are left out on purpose: upstream puts pos_embed in the Muon
    group, where weight decay slowly erases it.
    """
    muon, adam = [], []
    for _, p in named_params:
        if p.requires_grad:
            (muon if p.ndim >= 2 else adam).append(p)
    groups = []
    if muon:
        groups.append(dict(params=muon, use_muon=True, lr=muon_lr, weight_decay=muon_wd, momentum=momentum,
                           ns_steps=ns_steps))
    if adam:
        groups.append(dict(params=adam, use_muon=False, lr=adam_lr, weight_decay=adam_wd, betas=tuple(betas),
                           eps=eps))
    return groups


def grad_norms(grads: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """(n,) fp32: the 2-norm of each whole gradient (0 for None), computed the same way at every ZeRO stage."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([zero if g is None else torch.linalg.vector_norm(g.reshape(-1), dtype=torch.float32)
                        for g in grads]) if grads else zero.reshape(1)


def clip_coef(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """0-dim factor min(1, max_norm / (||norms|| + 1e-6)) for clipping by the global norm, kept on the device."""
    return torch.clamp(max_norm / (torch.linalg.vector_norm(norms) + 1e-6), max=1.0)


def _commit(dst: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> None:
    """dst <- new, or unchanged where the step is skipped (`keep` False), decided on the device."""
    dst.copy_(new if keep is None else torch.where(keep, new, dst))


class MuonWithAdam(torch.optim.Optimizer):
    """A non-zero `found_inf` device scalar attribute (set by the engine) makes `step()` a no-op, parameters and
    state included, without a host sync."""

    supports_found_inf = True
    clips_itself = True  # max_grad_norm replaces DeepSpeed's gradient_clipping (see the module docstring)

    def __init__(self, param_groups: list[dict], *, max_grad_norm: float = 0.0):
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        self.ns_calls = 0  # Newton-Schulz orthogonalisations run so far (a host count: the guard reads it)
        for g in param_groups:
            if "use_muon" not in g:
                raise ValueError("every MuonWithAdam param group needs a use_muon flag (see muon_param_groups)")
            if g["use_muon"]:
                g.setdefault("momentum", 0.95)
                g.setdefault("ns_steps", 5)
                g.setdefault("weight_decay", 0.0)
                bad = [tuple(p.shape) for p in g["params"] if p.ndim < 2]
                if bad:
                    raise ValueError(
                        f"Muon got parameters with fewer than 2 dims {bad[:3]}: the optimizer is seeing flattened "
                        "partitions (ZeRO or a DeepSpeed bf16/fp16 optimizer); build it with muon_param_groups on "
                        "the whole weights (igscale's ZeRO-1/2/3 forms shard it), precision fp32 or bf16_autocast"
                    )
            else:
                g.setdefault("betas", (0.9, 0.95))
                g.setdefault("eps", 1e-8)
                g.setdefault("weight_decay", 0.0)
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.max_grad_norm > 0:
            grads = [p.grad for g in self.param_groups for p in g["params"]]
            live = [g for g in grads if g is not None]
            if live:
                coef = clip_coef(grad_norms(grads, live[0].device), self.max_grad_norm)
                torch._foreach_mul_(live, coef)
        self._update()
        return loss

    def _update(self) -> None:
        """One update of every tensor in param_groups from its (already clipped) gradient."""
        found = getattr(self, "found_inf", None)
        keep = None if found is None else found == 0  # 0-dim bool on the device
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group, keep)
            else:
                self._adam_group(group, keep)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch leaves a loaded Adam step counter where it was saved (the CPU after map_location="cpu"); on the
        # parameter's device the step needs no host round trip
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            if torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)

    def _muon_group(self, group: dict, keep: torch.Tensor | None) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            m = state["momentum_buffer"]
            g2 = g.float().reshape(g.shape[0], -1)  # (rows, cols)
            m2 = m.view(g.shape[0], -1)
            m_new = m2.lerp(g2, 1.0 - beta)
            u = g2.lerp(m_new, beta)  # Nesterov
            _commit(m2, m_new, keep)
            rows, cols = u.shape
            u = newton_schulz5(u, group["ns_steps"]).float() * math.sqrt(max(1.0, rows / cols))
            self.ns_calls += 1
            adjusted_lr = lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1]))
            p_new = p * (1.0 - lr * wd)
            p_new.add_(u.view_as(p).to(p.dtype), alpha=-adjusted_lr)
            _commit(p, p_new, keep)

    def _adam_group(self, group: dict, keep: torch.Tensor | None) -> None:
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            elif not torch.is_tensor(state["step"]):  # a host-int counter from an older checkpoint
                state["step"] = torch.tensor(float(state["step"]), device=p.device)
            # the step counter lives on the device so that a skipped step can leave it untouched without a sync
            step = state["step"] + (1.0 if keep is None else keep.float())
            _commit(state["step"], step, None)
            g = p.grad.float()
            exp_avg = state["exp_avg"].lerp(g, 1.0 - b1)
            exp_avg_sq = (state["exp_avg_sq"] * b2).addcmul_(g, g, value=1.0 - b2)
            _commit(state["exp_avg"], exp_avg, keep)
            _commit(state["exp_avg_sq"], exp_avg_sq, keep)
            bc1 = 1.0 - torch.pow(b1, step)
            bc2 = 1.0 - torch.pow(b2, step)
            denom = (exp_avg_sq / bc2).sqrt_().add_(eps)
            p_new = p * (1.0 - lr * wd)
            p_new.add_((exp_avg / bc1 / denom).to(p.dtype), alpha=-lr)
            _commit(p, p_new, keep)


class NotMuonError(ConfigError):
    """A Muon config whose optimizer would not run Muon (it would train with Adam or a normalised SGD instead)."""


class MuonGuard:
    """Refuses a Muon run that would silently not be one. At start-up (`MuonGuard(optimizer)`, after DeepSpeed
    wrapped it) every Muon-group tensor must be a whole >= 2-D weight and there must be at least one; a flattened
    ZeRO or bf16-optimizer partition would get a column "orthogonalised" into a normalised-SGD step. After the
    first optimizer step (`check_first_step()`) the optimizer must have run one Newton-Schulz per Muon matrix."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if hasattr(optimizer, "muon_shapes"):  # ZeRO-2/3: the whole matrices its owners rebuild from partitions
            shapes = optimizer.muon_shapes()
        else:
            shapes = [tuple(p.shape) for g in optimizer.param_groups if g.get("use_muon") for p in g["params"]]
        flat = [s for s in shapes if len(s) < 2]
        if flat:
            raise NotMuonError(f"the Muon group holds {len(flat)} flattened tensor(s) {flat[:3]} instead of whole "
                               "weight matrices (a ZeRO partition or DeepSpeed's bf16/fp16 optimizer flattened "
                               "them): Newton-Schulz would act on 1-D slices, not Muon. Use optim.name=muon (igscale "
                               "shards whole matrices itself at every ZeRO stage) with precision fp32 or bf16_autocast")
        if not shapes:
            raise NotMuonError("optim.name=muon, but no trainable >= 2-D weight is in a Muon group: the run would "
                               "train every weight with Adam")
        if not hasattr(optimizer, "ns_calls"):
            raise NotMuonError(f"{type(optimizer).__name__} does not count its Newton-Schulz calls; igscale cannot "
                               "check that it runs Muon")
        self.optimizer, self.matrices = optimizer, len(shapes)
        # a sharded Muon orthogonalises only this rank's share of the matrices
        self.expected = getattr(optimizer, "ns_per_step", self.matrices)
        self.elements = sum(math.prod(s) for s in shapes)
        self._start = optimizer.ns_calls
        self.checked = False

    def check_first_step(self) -> None:
        ran = self.optimizer.ns_calls - self._start
        self.checked = True
        if ran != self.expected:
            raise NotMuonError(f"the first optimizer step ran Newton-Schulz {ran} time(s) for {self.expected} Muon "
                               "matrices: the other weights were not updated with Muon; refusing to continue")

    def describe(self) -> str:
        return f"Muon on {self.matrices} matrices ({self.elements / 1e6:.2f}M weights)"
