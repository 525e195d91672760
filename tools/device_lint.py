#!/usr/bin/env python3
"""Device and host-sync lint over amoc/ (`make lint`, so CI too). Standard library only.

Two rules, found by reading the code (ast), not by running it:

- ``factory``: a torch tensor factory (``torch.zeros``, ``ones``, ``empty``, ``full``,
  ``arange``, ``rand``, ``randn``, ``randint``, ``randperm``, ``tensor``, ``eye``, ...) or
  ``torch.Generator(...)`` called without a ``device=`` keyword, anywhere in amoc/. It
  lands on the CPU whatever device the run uses: on CUDA a wrong-device error, or a
  silent host copy every call. ``*_like`` and ``x.new_*`` take their input's device and
  are fine.
- ``sync``: a host sync inside a per-step hot path (``HOT``): ``.item()``, ``.tolist()``,
  ``.cpu()``, ``.numpy()``, ``.to("cpu")``, ``nonzero``/``unique``/``masked_select``/
  ``equal``/``allclose`` (data-dependent shapes or a Python bool), and ``int()``,
  ``float()``, ``bool()`` or an ``if``/``while``/``assert`` test over a tensor expression
  (a ``torch.*`` call or a tensor method such as ``.max()`` / ``.any()`` in it). On CUDA
  each one makes the host wait for the device. A bare name (``if mask:``) is beyond a
  syntax check; the host-sync detector of the tests (tests/sync_guard.py) catches those.

A finding that is right by design is allowed by a ``# device-ok: <reason>`` comment on a
line of the call (or test), or on a comment line right above it, or by an ``ALLOW`` entry
below (for code this lint must not edit). Exit status 1 and one ``path:line: rule: message`` line per finding; 0 when
clean. Usage: ``python tools/device_lint.py [root]`` (default: the repo's amoc/).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "range",
    "rand",
    "randn",
    "randint",
    "randperm",
    "tensor",
    "as_tensor",
    "eye",
    "linspace",
    "logspace",
    "empty_strided",
    "Generator",
}

# per-step hot paths: module (relative to amoc/) -> qualified names of functions, or "*"
# for every function of the module (nested functions belong to their enclosing one)
HOT: dict[str, set[str] | str] = {
    "pretrain/step.py": {"TrainStep.__call__", "TrainStep._enqueue"},
    "pretrain/attack.py": "*",
    "pretrain/moco.py": "*",
    "pretrain/losses.py": "*",
    "pretrain/ntxent.py": "*",
    "pretrain/lars.py": "*",
    "pretrain/contrastive.py": {"ContrastiveNet.forward", "contrast"},
    "pretrain/acl.py": {"ACLStep.__call__", "ACLStep.attack", "ACLStep.loss", "Forwards.forward"},
    "pretrain/rocl.py": {"RoCLStep.__call__", "RoCLStep.attack", "RoCLStep.loss", "Forwards.forward"},
    "pretrain/dynacl.py": {"DynACLStep.__call__", "DynACLStep.attack", "DynACLStep.loss", "DynACLNet.update_key"},
    "pretrain/augment.py": "*",
    "pretrain/stage.py": {"Pretraining.train_step"},
    "pretrain/log.py": {"EpochLog.add"},
    "attacks/pgd.py": "*",
    "attacks/ce.py": "*",
    "attacks/accuracy.py": "*",
    "attacks/autoattack.py": "*",
    "downstream/trainer.py": {"loss_step", "Forwards.forward", "ClassifierTraining.train_step"},
    "downstream/losses.py": "*",
    "downstream/augment.py": "*",
    "distributed/__init__.py": {"Shard.rows", "Shard.sample", "Dist.gather"},
    "distributed/bn.py": {"ShuffledKeys.__call__"},
    "runtime.py": {"Runtime.images"},
}

# "module:qualified name" -> why a finding there is right (code whose owners keep it so)
ALLOW: dict[str, str] = {
    "nets/resnet.py:Normalize.__init__": "module buffers built with the module; rt.prepare moves them",
}

SYNC_METHODS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "equal",
    "allclose",
    "is_nonzero",
    "synchronize",
}
# methods whose result is a tensor: a cast or a test over one of them reads the device
TENSOR_METHODS = {
    "sum",
    "mean",
    "max",
    "min",
    "amax",
    "amin",
    "aminmax",
    "any",
    "all",
    "argmax",
    "argmin",
    "norm",
    "abs",
    "std",
    "var",
    "prod",
    "count_nonzero",
    "float",
    "double",
    "half",
    "long",
    "int",
    "bool",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "isfinite",
    "isnan",
    "isinf",
    "logical_and",
    "logical_or",
    "logical_not",
    "squeeze",
    "detach",
    "clone",
}
CASTS = {"int", "float", "bool", "complex"}
# torch.<these>.* and torch.is_* / get_* read host state, not tensors
HOST_NAMESPACES = {"cuda", "backends", "distributed", "jit", "compiler", "_dynamo", "cpu"}


def dotted(node: ast.AST) -> list[str]:
    """torch.cuda.synchronize -> ["torch", "cuda", "synchronize"]; [] if not a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return []


def torch_call(call: ast.Call) -> list[str] | None:
    """The dotted name of a torch.* call, or None."""
    name = dotted(call.func)
    return name if len(name) >= 2 and name[0] == "torch" else None


def reads_tensor(expr: ast.AST) -> bool:
    """Whether an expression evaluates a tensor: a torch.* call or a tensor method in it."""
    for node in ast.walk(expr):
        if not isinstance(node, ast.Call):
            continue
        name = torch_call(node)
        if name is not None:
            if not (set(name[1:-1]) & HOST_NAMESPACES or name[-1].startswith(("is_", "get_"))):
                return True
        elif isinstance(node.func, ast.Attribute) and node.func.attr in TENSOR_METHODS:
            return True
    return False


class Finder(ast.NodeVisitor):
    def __init__(self, module: str, lines: list[str]) -> None:
        self.module, self.lines = module, lines
        self.stack: list[str] = []  # enclosing classes and functions
        self.function: str | None = None  # qualified name of the outermost enclosing function
        self.findings: list[tuple[int, str, str]] = []

    # ------------------------------------------------------------------ scopes
    def _scope(self, node: ast.AST, is_function: bool) -> None:
        self.stack.append(node.name)
        outer = self.function
        if is_function and outer is None:
            self.function = ".".join(self.stack)
        self.generic_visit(node)
        self.function = outer
        self.stack.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scope(node, False)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scope(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    # ------------------------------------------------------------------ rules
    def hot(self) -> bool:
        funcs = HOT.get(self.module)
        return funcs == "*" or (self.function is not None and funcs is not None and self.function in funcs)

    def report(self, node: ast.AST, rule: str, message: str) -> None:
        first, last = node.lineno, getattr(node, "end_lineno", None) or node.lineno
        if any("# device-ok:" in self.lines[i - 1] for i in range(first, last + 1)):
            return
        if first > 1 and self.lines[first - 2].strip().startswith("# device-ok:"):  # a comment line above
            return
        if f"{self.module}:{self.function}" in ALLOW:
            return
        where = f" in {self.function}" if self.function else ""
        self.findings.append((first, rule, message + where))

    def visit_Call(self, node: ast.Call) -> None:
        name = torch_call(node)
        if name is not None and len(name) == 2 and name[1] in FACTORIES:
            if not any(k.arg in ("device", None) for k in node.keywords):  # None: **kwargs
                self.report(node, "factory", f"torch.{name[1]}(...) without device=")
        if self.hot():
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in SYNC_METHODS:
                self.report(node, "sync", f".{func.attr}() reads the device from the host (a per-step path)")
            elif isinstance(func, ast.Attribute) and func.attr == "to" and self._to_cpu(node):
                self.report(node, "sync", '.to("cpu") copies to the host (a per-step path)')
            elif isinstance(func, ast.Name) and func.id in CASTS and node.args and reads_tensor(node.args[0]):
                self.report(node, "sync", f"{func.id}() of a tensor reads the device from the host (a per-step path)")
        self.generic_visit(node)

    @staticmethod
    def _to_cpu(node: ast.Call) -> bool:
        values = list(node.args) + [k.value for k in node.keywords if k.arg == "device"]
        return any(isinstance(v, ast.Constant) and v.value == "cpu" for v in values)

    def _test(self, node: ast.AST, test: ast.AST, what: str) -> None:
        if self.hot() and reads_tensor(test):
            self.report(node, "sync", f"{what} over a tensor reads the device from the host (a per-step path)")

    def visit_If(self, node: ast.If) -> None:
        self._test(node.test, node.test, "an if test")
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        self._test(node.test, node.test, "a while test")
        self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        self._test(node.test, node.test, "an assert")
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self._test(node.test, node.test, "a conditional expression")
        self.generic_visit(node)


def lint_file(path: Path, root: Path) -> list[str]:
    module = path.relative_to(root).as_posix()
    text = path.read_text()
    finder = Finder(module, text.splitlines())
    finder.visit(ast.parse(text, filename=str(path)))
    seen: set[tuple[int, str]] = set()
    out = []
    for line, rule, message in sorted(finder.findings):
        if (line, rule) not in seen:  # one finding per line and rule
            seen.add((line, rule))
            out.append(f"{root.name}/{module}:{line}: {rule}: {message}")
    return out


def lint(root: Path) -> list[str]:
    return [finding for path in sorted(root.rglob("*.py")) for finding in lint_file(path, root)]


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "amoc"
    findings = lint(root)
    for finding in findings:
        print(finding)
    if findings:
        print(
            f"device lint: {len(findings)} finding(s); pass device=, keep host reads out of the per-step paths, or "
            "justify one with a '# device-ok: <reason>' comment (tools/device_lint.py)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
