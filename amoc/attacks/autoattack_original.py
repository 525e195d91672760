"""Standard AutoAttack with the original code (Croce & Hein; PyPI `pyautoattack`).

`pyautoattack` 0.2.0 packages fra31/auto-attack at a39220048b3c (the commit RobustBench
pins): its APGD, APGD-T, FAB and Square files are that commit's, and its `AutoAttack`
sets the standard version (APGD-CE without restarts, APGD-T and FAB-T with 9 targets,
Square 5000 queries, fixed schedule). The attacks are the original's objects, set up by
the original's `AutoAttack(version="standard")`; this module drives them as the
original's `run_standard_evaluation` does (each attack in turn on the images still
robust, in consecutive batches of `batch_size` of them, each batch seeded with the seed)
and adds what that loop lacks:

- the robust accuracy after each attack, and its time;
- resume: after every batch the state (robust flags, finished attacks, the position in
  the current attack) is written atomically to `state_path`; a run killed and started
  again with the same model, images and settings continues from there, recomputing no
  finished attack and no finished batch, and ends with the same flags. (The original's
  own state file cannot do this, as checked with pyautoattack 0.2.0: it stores the set
  of attacks as a Python string (json.dump with default=str), so every restore is refused
  with "ValueError: The state was created with a different set of attacks to run"; with
  that repaired, a restored run raises "UnboundLocalError: ... 'y_adv'" as soon as an
  attack breaks an image; and the file is rewritten in place, so a kill while it is
  written corrupts it.)

The model's checks that the original runs first (randomised or dynamic defence, logits,
target classes) run once, with their warnings on the `auto-attack` logger.
"""

from __future__ import annotations

import hashlib
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amoc.errors import AmocError
from amoc.io import torch_load, torch_save

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # the standard version's order
STATE_FORMAT = "amoc-autoattack-state/1"


def pyautoattack_version() -> str:
    try:
        return version("pyautoattack")
    except PackageNotFoundError:
        return "not installed"


def build(model: nn.Module, eps: float, device: torch.device, seed: int, steps: int, queries: int, targets: int):
    """The original's standard AutoAttack, with amoc's iteration, query and target counts
    (the standard 100, 5000 and 9 unless a test shrinks them)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise AmocError(
            "evaluate.autoattack_impl: original needs the pyautoattack package (pip install pyautoattack); "
            "or set evaluate.autoattack_impl=torchattacks"
        ) from None
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    aa.verbose = False
    for apgd in (aa.apgd, aa.apgd_targeted):
        if apgd.n_iter != steps:  # the derived schedule is computed from n_iter in __init__
            apgd.n_iter = apgd.n_iter_orig = steps
            apgd.n_iter_2 = max(int(0.22 * steps), 1)
            apgd.n_iter_min = max(int(0.06 * steps), 1)
            apgd.size_decr = max(int(0.03 * steps), 1)
    aa.fab.n_iter = steps
    aa.square.n_queries = queries
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = targets
    return aa


def _perturb(aa: Any, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch through one attack, set up as the original's evaluation loop does."""
    if attack == "apgd-ce":
        aa.apgd.loss = "ce"
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)
    if attack == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if attack == "fab-t":
        aa.fab.targeted = True
        aa.fab.n_restarts = 1
        aa.fab.seed = aa.get_seed()
        return aa.fab.perturb(x, y)
    aa.square.seed = aa.get_seed()
    return aa.square.perturb(x, y)


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any]) -> str:
    """What the state belongs to: the weights, the images, the labels and the settings."""
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())  # device-ok: once per run
    for t in (x, y):
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())  # device-ok: once per run
    return h.hexdigest()


class _State:
    """The run's position, written after every batch (atomically) when a path is given."""

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key = path, key
        self.flags: torch.Tensor | None = None  # robust so far (bool, N, CPU)
        self.done: list[dict[str, Any]] = []  # per finished attack: name, robust count, seconds
        self.current: str | None = None
        self.todo: torch.Tensor | None = None  # the indices the current attack attacks
        self.next_batch = 0
        self.seconds = 0.0  # in the current attack, before the last resume
        self.worst = 0.0
        self.resumed: dict[str, Any] | None = None

    def load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            blob = torch_load(self.path)
        except AmocError:
            print(f"AutoAttack: {self.path} is unreadable; starting afresh", flush=True)
            return
        if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT or blob.get("key") != self.key:
            print(f"AutoAttack: {self.path} belongs to another model, image set or setting; starting afresh")
            return
        self.flags, self.done, self.current = blob["flags"], blob["done"], blob["current"]
        self.todo, self.next_batch, self.seconds, self.worst = (
            blob["todo"],
            blob["next_batch"],
            blob["seconds"],
            blob["worst"],
        )
        self.resumed = {"attacks_done": [d["attack"] for d in self.done], "current": self.current}
        self.resumed["next_batch"] = self.next_batch if self.current else None

    def save(self) -> None:
        if self.path is None:
            return
        torch_save(
            self.path,
            {
                "format": STATE_FORMAT,
                "key": self.key,
                "flags": self.flags,
                "done": self.done,
                "current": self.current,
                "todo": self.todo,
                "next_batch": self.next_batch,
                "seconds": self.seconds,
                "worst": self.worst,
            },
        )


def run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    eps: float,
    seed: int,
    steps: int,
    queries: int,
    targets: int,
    state_path: Path | None = None,
) -> dict[str, Any]:
    """Standard AutoAttack on images x (float in [0, 1], N x C x H x W, any device) and
    labels y. Returns {"robust": bool N on the CPU (robust = correct clean and after every
    attack), "per_attack": [{attack, robust, seconds}], "worst": largest L-inf
    perturbation returned, "resumed": what a resume skipped, or None}."""
    aa = build(model, eps, device, seed, steps, queries, targets)
    settings = {
        "eps": eps,
        "seed": seed,
        "batch_size": batch_size,
        "steps": steps,
        "queries": queries,
        "targets": targets,
        "pyautoattack": pyautoattack_version(),
        "device": device.type,
    }
    state = _State(state_path, fingerprint(model, x, y, settings))
    state.load()
    x_cpu, y_cpu = x.detach().to("cpu"), y.detach().to("cpu").long()
    if x_cpu.dtype == torch.uint8:
        x_cpu = x_cpu.float().div_(255)

    def batch(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_cpu[index].to(device).float().contiguous(), y_cpu[index].to(device)

    from pyautoattack import checks

    first = torch.arange(min(batch_size, len(x_cpu)), device="cpu")
    if len(first):
        xb, yb = batch(first)
        checks.check_randomized(aa.get_logits, xb, yb, bs=batch_size, logger=aa.logger)
        n_cls = checks.check_range_output(aa.get_logits, xb, logger=aa.logger)
        checks.check_dynamic(model, xb, False, logger=aa.logger)
        checks.check_n_classes(n_cls, aa.attacks_to_run, targets, targets, logger=aa.logger)

    if state.flags is None:  # clean accuracy: the images every attack starts from
        flags = []
        with torch.no_grad():
            for start in range(0, len(x_cpu), batch_size):
                xb, yb = batch(torch.arange(start, min(start + batch_size, len(x_cpu)), device="cpu"))
                flags.append((aa.get_logits(xb).argmax(1) == yb).to("cpu"))
        state.flags = torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool, device="cpu")
        state.save()

    finished = {d["attack"] for d in state.done}
    for attack in ATTACKS:
        if attack in finished:
            continue
        if state.current != attack:  # a fresh attack: the images still robust, in order
            state.current, state.next_batch, state.seconds = attack, 0, 0.0
            state.todo = state.flags.nonzero().flatten()
        t0 = time.perf_counter()
        todo = state.todo
        n_batches = -(-len(todo) // batch_size)
        for b in range(state.next_batch, n_batches):
            index = todo[b * batch_size : (b + 1) * batch_size]
            xb, yb = batch(index)
            adv = _perturb(aa, attack, xb, yb).detach()
            with torch.no_grad():
                broken = (aa.get_logits(adv).argmax(1) != yb).to("cpu")
            state.flags[index[broken]] = False
            state.worst = max(state.worst, float((adv - xb).abs().amax()))  # device-ok: once per batch
            state.next_batch = b + 1
            state.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            state.save()
        state.done.append(
            {"attack": attack, "robust": int(state.flags.sum()), "seconds": round(state.seconds, 3)}  # device-ok
        )
        state.current, state.todo, state.next_batch = None, None, 0
        state.save()
    return {"robust": state.flags, "per_attack": state.done, "worst": state.worst, "resumed": state.resumed}
