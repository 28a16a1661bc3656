"""Lookahead (Zhang et al. 2019), docs/theory.md section 4: k fast steps forward, one slow step back.

    phi_0 = theta_0
    every step:       theta <- theta + A(theta)          (the inner optimizer)
    every k-th step:  phi <- phi + alpha (theta - phi);  theta <- phi

The design follows timm: this object shares ``param_groups`` and ``state`` with the inner optimizer,
so hyperparameter changes (``set_hyperparams``, lr schedulers) reach the inner optimizer, and
``state_dict()`` is the inner optimizer's state dict with two additions: the slow weights, under
``lookahead_slow`` in each parameter's state, and the per-group keys ``lookahead_k``,
``lookahead_alpha`` and ``lookahead_step`` (steps taken, which fixes the position in the k-cycle).
A checkpoint taken anywhere in the cycle therefore resumes exactly.

Unlike timm, the slow weights start at the weights before the first step (phi_0 = theta_0, as in
the paper), not at the fast weights of the first sync.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.optim import Optimizer

SLOW_KEY = "lookahead_slow"


class Lookahead(Optimizer):
    """Wraps ``inner`` (any ``torch.optim.Optimizer``) with slow weights synced every ``k`` steps."""

    def __init__(self, inner: Optimizer, *, k: int = 5, alpha: float = 0.5) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and alpha in (0, 1]; got k={k}, alpha={alpha}")
        self.inner = inner
        # Registers the lookahead keys in the inner optimizer's group dicts (add_param_group fills
        # defaults in place), then takes over the inner optimizer's group list and state.
        super().__init__(inner.param_groups, dict(lookahead_k=k, lookahead_alpha=alpha, lookahead_step=0))
        self._share_inner()

    def _share_inner(self) -> None:
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self.defaults = {**self.inner.defaults, "lookahead_k": self.param_groups[0]["lookahead_k"],
                         "lookahead_alpha": self.param_groups[0]["lookahead_alpha"]}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        # Parameters seen with a gradient for the first time: remember theta before the inner step
        # moves it. The slow weights enter the state only after the inner step, because torch's
        # optimizers initialise a parameter's state only when they find it empty.
        starts = [(p, p.detach().clone(memory_format=torch.preserve_format))
                  for group in self.param_groups for p in group["params"]
                  if p.grad is not None and SLOW_KEY not in self.state[p]]
        loss = self.inner.step(closure)
        for p, start in starts:
            self.state[p][SLOW_KEY] = start
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                self._sync(group)
        return loss

    def _sync(self, group: dict) -> None:
        fast = [p for p in group["params"] if SLOW_KEY in self.state[p]]
        if not fast:
            return
        slow = [self.state[p][SLOW_KEY] for p in fast]
        torch._foreach_lerp_(slow, fast, group["lookahead_alpha"])  # phi += alpha (theta - phi)
        torch._foreach_copy_(fast, slow)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group in state_dict["param_groups"]:
            if "lookahead_step" not in group:
                raise ValueError("this optimizer state was saved without Lookahead; build the optimizer with "
                                 "the same optim.lookahead setting as the checkpoint")
        self.inner.load_state_dict(state_dict)
        self._share_inner()  # torch's load_state_dict replaces the inner group list and state

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the slow weights; the fast ones come back after it."""
        with torch.no_grad():
            params = [p for group in self.param_groups for p in group["params"] if SLOW_KEY in self.state[p]]
            fast = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
            if params:
                torch._foreach_copy_(params, [self.state[p][SLOW_KEY] for p in params])
        try:
            yield
        finally:
            with torch.no_grad():
                if params:
                    torch._foreach_copy_(params, fast)
