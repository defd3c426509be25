"""The optimizer and learning-rate schedule a config names, by Hydra's ``_target_``: ``conf/optimizer/*.yaml``
(AdamW, Adafactor, Muon with AdamW, SGD, schedule-free AdamW, 8-bit AdamW) and ``conf/scheduler/*.yaml``
(cosine, linear, constant, warmup-stable-decay), or any class / function a user names::

    python train.py optimizer=muon scheduler=wsd
    python train.py optimizer._target_=torch.optim.RAdam +optimizer.decoupled_weight_decay=true

An optimizer is any class that takes parameter groups as its first argument: it gets the vision / connector /
text groups with their own peak learning rates and weight decay (``training.*``), and the keys of its config
section as keyword arguments. A schedule is a function ``(step, warmup_steps, total_steps, min_ratio, **keys)``
giving the multiplier of each group's peak rate, ``min_ratio`` that group's floor (``training.min_lr``).
What cannot be built (an unknown class, a missing package, a keyword the class does not take) is one
:class:`~granite_docling.config.ConfigError` line.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from granite_docling.config import ConfigError

log = logging.getLogger(__name__)

# Packages of optional optimizers: what to install when a target's module is missing.
INSTALL = {"schedulefree": "schedulefree", "bitsandbytes": "bitsandbytes"}
# Parameter names (prefixes of the part after ``model.``) of the transformer blocks whose 2-D weights Muon trains.
MUON_BLOCKS = ("vision_model.encoder.layers.", "text_model.layers.")


def cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup, then a straight line down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1 - (1 - min_ratio) * progress


def constant(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup, then the peak rate to the end (``total_steps`` and ``min_ratio`` unused)."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def wsd(step: int, warmup_steps: int, total_steps: int, min_ratio: float, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay: linear warmup, the peak rate, then linear down to ``min_ratio`` over the last
    ``decay_fraction`` of ``total_steps``."""
    if not 0 <= decay_fraction <= 1:
        raise ConfigError(f"scheduler.decay_fraction={decay_fraction} must be between 0 and 1")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1 - (1 - min_ratio) * progress


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the parameter groups marked ``muon: True`` (2-D matrices), AdamW on the others: one optimizer to
    the loop, the schedule and checkpoints (its state_dict is torch's, over every group).

    ``muon`` and ``adamw`` are the keyword arguments of ``torch.optim.Muon`` and ``torch.optim.AdamW``; ``lr`` and
    ``weight_decay`` are each group's own. The two inner optimizers share this one's groups and state.
    """

    marks_block_matrices = True  # make_optimizer splits each group into its block matrices and the rest

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, muon: dict | None = None, adamw=None):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "muon": False})
        self.settings = {"muon": dict(muon or {}), "adamw": dict(adamw or {})}
        self._bind()

    def _bind(self) -> None:
        """Inner optimizers over this one's groups (the same dicts) and state."""
        self.inner: list[tuple[bool, torch.optim.Optimizer]] = []
        for muon, make in ((True, torch.optim.Muon), (False, torch.optim.AdamW)):
            groups = [g for g in self.param_groups if g["muon"] == muon]
            if groups:
                self.inner.append((muon, make(groups, **self.settings["muon" if muon else "adamw"])))
        for _, optimizer in self.inner:
            optimizer.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for _, optimizer in self.inner:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: the inner optimizers follow them
        for muon, optimizer in self.inner:
            optimizer.param_groups = [g for g in self.param_groups if g["muon"] == muon]
            optimizer.state = self.state


def _install_hint(target: str) -> str:
    package = INSTALL.get(target.split(".")[0])
    return f": pip install {package} (or pip install 'granite-docling[optimizers]')" if package else ""


def locate(section: Mapping, group: str) -> Callable:
    """The class or function ``section._target_`` names; one :class:`ConfigError` line when it cannot be found."""
    target = section.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{group}._target_ is not set: choose {group}=NAME (see conf/{group}/)")
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except ImportError as error:
        if target.split(".")[0] in INSTALL:
            raise ConfigError(f"{group}._target_={target} is not installed{_install_hint(target)}") from None
        raise ConfigError(f"{group}._target_={target} cannot be found ({error})") from None
    except AttributeError:
        found = None
    if not callable(found):
        raise ConfigError(f"{group}._target_={target} cannot be found: give package.module.Name") from None
    return found


def keywords(section: Mapping) -> dict[str, Any]:
    """The keyword arguments of a config section: every key but Hydra's ``_target_``, ``_partial_``...."""
    plain = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return {key: value for key, value in plain.items() if not (key.startswith("_") and key.endswith("_"))}


def check_keywords(target: Callable, given: dict[str, Any], group: str, fixed: tuple[str, ...]) -> None:
    """One :class:`ConfigError` line naming the keys of ``given`` that ``target`` does not take."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: it will say so itself
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(given) - set(parameters))
    if unknown:
        takes = ", ".join(name for name in parameters if name not in ("self", *fixed)) or "nothing"
        removal = " ".join(f"~{group}.{name}" for name in unknown)
        raise ConfigError(
            f"{group}: {getattr(target, '__qualname__', target)} takes no {', '.join(unknown)} (it takes {takes}); "
            f"remove with {removal}"
        )


def block_matrix_groups(model: torch.nn.Module, groups: list[dict]) -> list[dict]:
    """Each group split in two: its 2-D weights inside the vision and text transformer blocks (``muon: True``)
    and the rest (``muon: False``: embeddings, output layer, norms, biases, patch embedding, connector)."""
    names = {id(p): name for name, p in model.named_parameters()}
    split = []
    for group in groups:
        inside = [p for p in group["params"] if p.ndim == 2 and any(b in names[id(p)] for b in MUON_BLOCKS)]
        rest = [p for p in group["params"] if not any(p is q for q in inside)]
        for params, muon in ((inside, True), (rest, False)):
            if params:
                name = f"{group['name']}_muon" if muon else group["name"]
                split.append({**group, "name": name, "params": params, "muon": muon})
    return split


def build_optimizer(model: torch.nn.Module, groups: list[dict], section: Mapping) -> torch.optim.Optimizer:
    """The optimizer ``section`` names over ``groups`` (fused where the class can be: CUDA and CPU)."""
    target = locate(section, "optimizer")
    given = keywords(section)
    check_keywords(target, given, "optimizer", ("params",))
    if getattr(target, "marks_block_matrices", False):
        groups = block_matrix_groups(model, groups)
    extra = {}
    if "fused" not in given and "fused" in _parameters(target):
        devices = {p.device.type for g in groups for p in g["params"]}
        extra["fused"] = devices <= {"cuda", "cpu"}
    try:
        return instantiate(section, _partial_=True, _convert_="all", **extra)(groups)
    except (TypeError, ValueError) as error:  # a keyword a nested class does not take, a value out of range
        raise ConfigError(f"optimizer._target_={section['_target_']} cannot be built: {error}") from None


def _parameters(target: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}


def build_schedule(
    optimizer: torch.optim.Optimizer, section: Mapping, warmup_steps: int, total_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's multiplier per step from the function ``section`` names, with that group's floor
    ``min_lr / lr``."""
    target = locate(section, "scheduler")
    given = keywords(section)
    check_keywords(target, given, "scheduler", ("step", "warmup_steps", "total_steps", "min_ratio"))
    schedule = functools.partial(target, **given)
    schedule(0, warmup_steps, total_steps, 0.0)  # a bad keyword value fails here, before any step
    min_ratios = [min_lr / group["lr"] for group in optimizer.param_groups]
    lambdas = [lambda step, r=r: schedule(step, warmup_steps, total_steps, r) for r in min_ratios]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def state_bytes(optimizer: torch.optim.Optimizer) -> int | None:
    """Bytes of the state ``optimizer`` makes at its first update, measured by stepping a copy of it: over
    shapes alone (the meta device, nothing allocated), or where the class cannot step there (Adafactor reads a
    step count with ``.item()``), over zeros on the CPU, one parameter shape at a time. None when neither steps."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    on_meta = _copy_state_bytes(inner, inner.param_groups, "meta")
    if on_meta is not None:
        return on_meta
    total = 0
    measured: dict[tuple, int | None] = {}
    for group in inner.param_groups:
        for p in group["params"]:
            key = (tuple(p.shape), p.dtype, id(group))
            if key not in measured:
                measured[key] = _copy_state_bytes(inner, [{**group, "params": [p]}], "cpu")
            if measured[key] is None:
                return None
            total += measured[key]
    return total


def _copy_state_bytes(optimizer: torch.optim.Optimizer, groups: list[dict], device: str) -> int | None:
    """The state bytes of a copy of ``optimizer`` over ``groups`` on ``device`` after one step of zero
    gradients (the step count tensors left out: they are not per weight)."""
    try:
        copies = []
        for group in groups:
            params = [torch.zeros_like(p, device=device).requires_grad_() for p in group["params"]]
            for p in params:
                p.grad = torch.zeros_like(p)
            flags = {key: False for key in ("fused", "foreach", "capturable") if key in group}
            copies.append({**group, **flags, "params": params})
        copy = type(optimizer)(copies, **getattr(optimizer, "settings", {}))
        if callable(getattr(copy, "train", None)):
            copy.train()
        copy.step()
        tensors = [value for state in copy.state.values() for value in state.values() if torch.is_tensor(value)]
        return sum(t.numel() * t.element_size() for t in tensors if t.dim())
    except Exception as error:  # an optimizer that does not step there: the caller falls back
        log.debug("could not step a copy of %s on %s: %s", type(optimizer).__name__, device, error)
        return None


@contextlib.contextmanager
def evaluation_weights(optimizer) -> Iterator[None]:
    """The weights to evaluate and save are in the model inside: a schedule-free optimizer trains at a point
    ``y`` and switches the model to its average ``x`` with ``eval()``, and back with ``train()``. Nothing for
    the others."""
    switches = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switches:
        optimizer.eval()
    try:
        yield
    finally:
        if switches:
            optimizer.train()
