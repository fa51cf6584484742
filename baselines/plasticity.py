"""Plasticity tools for actor-critic agents (Ma et al. 2024, "Revisiting Plasticity in Visual RL", arXiv 2310.07418).

* :class:`FAUMonitor`: the Fraction of Active Units (paper Eq. 1: units with activation > 0 over all units of a
  module, averaged over the batch) read by forward hooks on the ReLU layers, on the forward passes the losses
  already make: no extra forward pass.
* :class:`UpdateSchedule`: a replay ratio (updates per agent step, 0.5 / 1 / 2 ...) as a credit counter.
* :class:`AdaptiveReplayRatio`: ARR (paper Sec. 6; authors' code ``train_adapt_rr.py``): start at a low ratio,
  compare the critic's FAU every ``interval`` episodes, switch once to the high ratio when it changed by at most
  ``threshold``.
* :func:`reinitialize`: Reset (Nikishin et al. 2022, arXiv 2205.07802): re-draw a module's parameters in place and
  forget their optimiser state.
* :class:`InjectedHead`: Plasticity Injection (Nikishin et al. 2023, arXiv 2305.15555): ``h(x) = h_old(x) +
  h_new(x) - h_new0(x)`` with ``h_old`` and the copy ``h_new0`` frozen, so the output is unchanged at injection.

The plasticity fixes Ma et al. compare with data augmentation (paper Fig. 2):

* :class:`CReLU`: concatenated ReLU (Abbas et al. 2023, arXiv 2303.07507).
* :func:`shrink_perturb`: Shrink & Perturb (Ash & Adams 2020, arXiv 1910.08475) towards a fresh initialisation.
* :func:`snapshot` and :func:`l2_init_penalty`: L2-Init (Kumar et al. 2023, arXiv 2308.11958), a penalty towards the
  initial parameters.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


class FAUMonitor:
    """Counts active units of watched modules (ReLUs) during the forward passes run under :meth:`record`.

    Groups (``"critic"``, ``"encoder"``, ``"actor"``) pool their layers: FAU = active units / units over every
    layer and every sample recorded since the last :meth:`take`. Counts stay tensors until read, so recording
    never synchronises a GPU.
    """

    def __init__(self) -> None:
        self._members: dict[str, list[nn.Module]] = {}  # group -> its modules
        self._watchers: dict[nn.Module, list[str]] = {}  # module -> the groups watching it (one hook per module)
        self._handles: dict[nn.Module, Any] = {}
        self._active: dict[str, torch.Tensor | None] = {}
        self._total: dict[str, int] = {}
        self._recording: frozenset[str] = frozenset()

    def watch(self, group: str, modules: Iterable[nn.Module]) -> None:
        """Watch the outputs of ``modules`` as ``group`` (replacing what the group watched before)."""
        for module in self._members.pop(group, []):
            self._watchers[module].remove(group)
            if not self._watchers[module]:
                del self._watchers[module]
                self._handles.pop(module).remove()
        self._members[group] = list(modules)
        for module in self._members[group]:
            if module not in self._watchers:
                self._watchers[module] = []
                self._handles[module] = module.register_forward_hook(self._hook)
            self._watchers[module].append(group)
        self._active.setdefault(group, None)
        self._total.setdefault(group, 0)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # A module in several groups (a layer and the pool of all layers) is counted once per forward pass and
        # added to each: counting twice with `(output > 0).sum()` was ~16% of an AD training step on one thread
        # (tests/bench_ad.py::test_fau_overhead; 4.5% now).
        # count_nonzero is exact (int64) and ~3x faster than a sum over the boolean mask on a CPU.
        groups = [g for g in self._watchers.get(module, ()) if g in self._recording]
        if not groups:
            return
        count = torch.count_nonzero(output.detach() > 0)
        for group in groups:
            prev = self._active[group]
            self._active[group] = count if prev is None else prev + count
            self._total[group] += output.numel()

    @contextlib.contextmanager
    def record(self, *groups: str) -> Iterator[None]:
        """Count the activations of ``groups`` (one or more) during the forward passes inside this block."""
        for group in groups:
            if group not in self._members:
                raise KeyError(f"FAU group `{group}` is not watched; watched: {sorted(self._members)}")
        previous, self._recording = self._recording, frozenset(groups)
        try:
            yield
        finally:
            self._recording = previous

    def mean(self, group: str) -> float | None:
        """FAU of ``group`` pooled since the last :meth:`take`; ``None`` if nothing was recorded."""
        active = self._active.get(group)
        return None if active is None else float(active) / self._total[group]

    def take(self, group: str) -> float | None:
        """:meth:`mean`, then start a new pool."""
        value = self.mean(group)
        self._active[group], self._total[group] = None, 0
        return value

    @property
    def groups(self) -> list[str]:
        return list(self._members)

    def take_all(self, prefix: str = "fau/") -> dict[str, float]:
        """``{prefix + group: FAU}`` of every group that recorded something since its last take; starts new
        pools."""
        values = {prefix + g: self.take(g) for g in self.groups}
        return {k: v for k, v in values.items() if v is not None}


def watch_layers(monitor: FAUMonitor, layers: list[tuple[str, nn.Module]], pooled: str = "hidden") -> list[str]:
    """Watch each ``(name, module)`` as its own group and all of them pooled as ``pooled``; returns the group
    names to pass to :meth:`FAUMonitor.record`. Used to give every torch method of the suite the same per-layer
    FAU readout as DrQ-v2's critic (issue: FAU for every method)."""
    for name, module in layers:
        monitor.watch(name, [module])
    monitor.watch(pooled, [m for _, m in layers])
    return [name for name, _ in layers] + [pooled]


class UpdateSchedule:
    """How many updates each agent step makes, for a replay ratio of ``ratio`` updates per agent step.

    A credit counter: ratio 0.5 updates on every second step, 2 makes two updates (two fresh batches) per step.
    The credit starts at ``max(0, 1 - ratio)`` so that ratio 0.5 updates on the first step after the seed frames'
    second, as DrQ-v2's ``step % update_every_steps == 0`` does.
    """

    def __init__(self, ratio: float) -> None:
        if not ratio > 0:
            raise ValueError(f"replay ratio must be > 0, got {ratio!r}")
        self.ratio = float(ratio)
        self.credit = max(0.0, 1.0 - self.ratio)

    def due(self) -> int:
        """Updates to make at this agent step."""
        self.credit += self.ratio
        n = int(self.credit + 1e-9)
        self.credit -= n
        return n

    def state_dict(self) -> dict[str, float]:
        return {"ratio": self.ratio, "credit": self.credit}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.ratio, self.credit = float(state["ratio"]), float(state["credit"])


@dataclass
class AdaptiveReplayRatio:
    """ARR's switch rule (Ma et al. 2024, Sec. 6): every ``interval`` episodes compare the critic's FAU with its
    value at the previous check (the first: the FAU of the first update) and switch once from ``low`` to ``high``
    when ``|change| <= threshold``. The FAU compared at a check is the mean over the last episode's updates, as in
    the authors' ``train_adapt_rr.py``, which counts the interval from the run's first episode (seed episodes
    included). With ``from_first_update`` the interval counts from the episode of the first update instead, so the
    first check sees ``interval`` episodes of training: a rescaled interval of a few episodes (the quick preset)
    would otherwise compare the first update's FAU with one episode of training, too early for a critic to move."""

    low: float = 0.5
    high: float = 2.0
    interval: int = 50
    threshold: float = 0.001
    from_first_update: bool = False
    previous: float | None = None
    """Critic FAU at the previous check (before the first: the first update's)."""
    first_update_episode: int | None = None
    """Episodes completed when the first update was made."""
    switched_at: int | None = None
    """Frame of the switch, once it happened."""

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"ARR interval must be a positive number of episodes, got {self.interval!r}")

    @property
    def ratio(self) -> float:
        return self.low if self.switched_at is None else self.high

    def start(self, first_fau: float | None, episode: int = 0) -> None:
        """Give the FAU of the first update, made after ``episode`` completed episodes (later calls are
        ignored)."""
        if self.previous is None and first_fau is not None:
            self.previous, self.first_update_episode = float(first_fau), int(episode)

    def end_episode(self, episode: int, fau: float | None, frame: int) -> bool:
        """After the ``episode``-th episode (1-based) with the critic's mean FAU ``fau`` over its updates; True
        exactly when the ratio switches now."""
        if self.switched_at is not None or self.previous is None or fau is None:
            return False
        counted = episode - (self.first_update_episode or 0) if self.from_first_update else episode
        if counted <= 0 or counted % self.interval:
            return False
        change, self.previous = abs(float(fau) - self.previous), float(fau)
        if change <= self.threshold:
            self.switched_at = int(frame)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def reinitialize(
    module: nn.Module, init: Callable[[nn.Module], None], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Reset: re-draw ``module``'s parameters in place (``reset_parameters`` then ``init``) and drop their state
    in ``optimizers`` (Adam's moments restart), so hooks and optimiser param groups stay valid."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    module.apply(init)
    params = set(module.parameters())
    for opt in optimizers:
        for p in list(opt.state):
            if p in params:
                del opt.state[p]


class InjectedHead(nn.Module):
    """Plasticity Injection on one head: ``original(x) + fresh(x) - anchor(x)``.

    ``original`` (the trained head) and ``anchor`` (a copy of ``fresh`` at injection) are frozen; only ``fresh``
    learns. Right after injection ``fresh == anchor``, so the output is unchanged; the inputs still receive
    gradients through all three, as in the authors' DrQ-v2 implementation (Guozheng-Ma/Plasticity-Injection_Torch).
    """

    def __init__(self, original: nn.Module, fresh: nn.Module) -> None:
        super().__init__()
        self.original = original.requires_grad_(False)
        self.fresh = fresh
        self.anchor = copy.deepcopy(fresh).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the difference first: it is exactly 0 at injection, so the output is bit-for-bit unchanged
        return self.original(x) + (self.fresh(x) - self.anchor(x))


class CReLU(nn.Module):
    """Concatenated ReLU (Abbas et al. 2023): ``[relu(x), relu(-x)]`` along the last dimension, twice as wide as its
    input, so the next Linear takes ``2 x`` its width. Of each pair exactly one output is positive unless ``x == 0``:
    the layer's FAU (its outputs > 0, as for a ReLU) is at most 0.5 and a unit can never die."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)


def fresh_copy(module: nn.Module, init: Callable[[nn.Module], None]) -> nn.Module:
    """A copy of ``module`` whose parameters are re-drawn as at construction (``reset_parameters``, then ``init``),
    from the global torch generator; ``module`` itself is untouched."""
    fresh = copy.deepcopy(module)
    reinitialize(fresh, init)
    return fresh


@torch.no_grad()
def shrink_perturb(module: nn.Module, init: Callable[[nn.Module], None], alpha: float, sigma: float) -> None:
    """Shrink & Perturb in place: ``theta <- alpha * theta + sigma * theta_fresh`` for every trainable parameter, with
    ``theta_fresh`` from :func:`fresh_copy` (the module's own initialisation, a new draw). Frozen parameters
    (``requires_grad`` False: a frozen encoder, an injected head's frozen halves) are left as they are; optimiser
    state is kept (the optimiser goes on with the shrunk parameters)."""
    fresh = fresh_copy(module, init)
    for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
        if p.requires_grad:
            p.copy_(alpha * p + sigma * q)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s parameters by name: L2-Init's ``theta_0``."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def l2_init_penalty(module: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-Init's ``||theta - theta_0||^2`` (a sum of squares, unscaled) over ``module``'s trainable parameters that
    ``anchor`` holds (parameters added later, e.g. injected heads, have no ``theta_0`` and are not pulled)."""
    terms = [(p - anchor[name]).pow(2).sum() for name, p in module.named_parameters()
             if p.requires_grad and name in anchor]
    if not terms:
        return torch.zeros((), device=next(iter(anchor.values())).device if anchor else None)
    return torch.stack(terms).sum()
