"""The code's shape (STYLE.md, issue 31): no function in the package over 80 lines, and none over 6 parameters
unless its docstring says why with "<N> parameters" (a command's options, an algorithm's inputs, a generator's
knobs). The loop's two functions, ``train`` and ``train_step``, are held to the same 80 lines by name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "granite_docling"
MAX_LINES = 80
MAX_PARAMETERS = 6

Function = ast.FunctionDef | ast.AsyncFunctionDef


def functions() -> list[tuple[str, Function]]:
    """(``path:line name``, node) for every function and method of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, Function):
                found.append((f"{where}:{node.lineno} {node.name}", node))
    return found


def lines(node: Function) -> int:
    """From the ``def`` line to the last line (decorators not counted)."""
    return node.end_lineno - node.lineno + 1


def parameters(node: Function) -> list[str]:
    """Its parameters, ``self`` and ``cls`` left out, ``*args`` and ``**kwargs`` counted."""
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
    return names + [f"*{a.arg}" for a in (args.vararg,) if a] + [f"**{a.arg}" for a in (args.kwarg,) if a]


def test_no_function_is_over_80_lines():
    long = [f"{name}: {lines(node)} lines" for name, node in functions() if lines(node) > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines (split them): " + "; ".join(long)


def test_no_function_has_over_6_parameters_without_a_reason():
    unexplained = []
    for name, node in functions():
        count = len(parameters(node))
        if count > MAX_PARAMETERS and f"{count} parameters" not in (ast.get_docstring(node) or ""):
            unexplained.append(f"{name}: {count} parameters")
    assert not unexplained, (
        f"functions over {MAX_PARAMETERS} parameters whose docstring gives no reason (group them into an object, "
        f'or say why in the docstring as "<N> parameters: ..."): ' + "; ".join(unexplained)
    )


def test_the_loop_and_its_step_are_each_at_most_80_lines():
    tree = ast.parse((PACKAGE / "train_loop.py").read_text(encoding="utf-8"))
    found = {node.name: node for node in tree.body if isinstance(node, Function)}
    for name in ("train", "train_step"):
        assert name in found, f"granite_docling/train_loop.py has no top-level {name}()"
        assert lines(found[name]) <= MAX_LINES, f"train_loop.{name} is {lines(found[name])} lines (at most 80)"


def test_the_checks_catch_what_they_are_for():
    """A long function, and a wide one without and with its reason, as the checks above read them."""
    wide = "def f(a, b, c, d, e, g, *h):\n    pass\n"
    explained = 'def f(a, b, c, d, e, g, *h):\n    """7 parameters: an algorithm\'s inputs."""\n'
    long = "def f():\n" + "    x = 1\n" * MAX_LINES
    (wide_node,), (explained_node,), (long_node,) = (ast.parse(code).body for code in (wide, explained, long))
    assert len(parameters(wide_node)) == 7 and "7 parameters" not in (ast.get_docstring(wide_node) or "")
    assert "7 parameters" in ast.get_docstring(explained_node)
    assert lines(long_node) == MAX_LINES + 1
