"""``python-stdlib-docstrings``: an instruction set built on demand from the running interpreter's
standard library, so SFT runs on every machine without a download.

Each example is one public function or method with a docstring: the instruction is its
signature (``json.dumps(obj, *, skipkeys=False, ...)``, annotations left out, ``self``/``cls``
dropped), the response the first paragraph of its docstring with whitespace collapsed. Files are
parsed with ``ast`` (nothing is imported, so no module runs), in the sorted file order of the
``python-stdlib`` corpus (no site-packages, no test directories), functions in source order.
Private modules and names (a leading underscore), dunder methods, paragraphs shorter than
``MIN_CHARS`` or longer than ``MAX_CHARS``, signatures longer than ``MAX_SIGNATURE`` and repeated
instructions are left out. The set depends only on the Python version's standard library (about
4,300 examples on CPython 3.11; parsing it takes a few seconds).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from distllm.data.corpus import stdlib_dir, stdlib_files

DOCSTRINGS = "python-stdlib-docstrings"
MIN_CHARS = 20
MAX_CHARS = 400
MAX_SIGNATURE = 100


def module_name(path: str, root: Path) -> str | None:
    """``json/decoder.py`` -> ``json.decoder``; None for private modules (a part starting with ``_``)."""
    parts = list(Path(path).relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    """``name(args)`` without annotations; a method's first argument (self / cls) is dropped unless
    it is a staticmethod."""
    args = ast.arguments(
        posonlyargs=[ast.arg(a.arg) for a in fn.args.posonlyargs],
        args=[ast.arg(a.arg) for a in fn.args.args],
        vararg=fn.args.vararg and ast.arg(fn.args.vararg.arg),
        kwonlyargs=[ast.arg(a.arg) for a in fn.args.kwonlyargs],
        kw_defaults=fn.args.kw_defaults,
        kwarg=fn.args.kwarg and ast.arg(fn.args.kwarg.arg),
        defaults=fn.args.defaults,
    )
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if method and not static:
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        elif args.args:
            args.args = args.args[1:]
        if len(args.defaults) > len(args.posonlyargs) + len(args.args):  # the dropped argument had a default
            args.defaults = args.defaults[1:]
    return f"{fn.name}({ast.unparse(args)})"


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph (up to the first blank line) on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """(qualified prefix, function, is a method) for the module's public functions and public methods
    of its public classes, in source order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield "", node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name + ".", item, True


def docstring_pairs(files: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """(instruction, response) pairs from ``files`` (default: the whole standard library), in order."""
    root = stdlib_dir()
    seen: set[str] = set()
    for path in stdlib_files() if files is None else files:
        module = module_name(path, root)
        if module is None:
            continue
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=os.path.basename(path))
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):  # e.g. lib2to3's Python 2 fixtures
            continue
        for prefix, fn, method in _functions(tree):
            if fn.name.startswith("_"):
                continue
            doc = ast.get_docstring(fn, clean=True)
            if not doc:
                continue
            response = first_paragraph(doc)
            sig = signature(fn, method)
            if not MIN_CHARS <= len(response) <= MAX_CHARS or len(sig) > MAX_SIGNATURE:
                continue
            instruction = f"{module}.{prefix}{sig}"
            if instruction in seen:
                continue
            seen.add(instruction)
            yield instruction, response
