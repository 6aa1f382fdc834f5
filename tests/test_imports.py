"""The house rules on imports, checked over every module of `vilbert/` (read with `ast`, not imported):
no module imports another module's underscore name, a private module (`_name.py`) is imported only
from inside its own package, and nothing outside `vilbert/cli/` imports from `vilbert.cli`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vilbert"


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in `path`."""
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((node.lineno, module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _violations(path: Path, root: Path = PACKAGE) -> list[str]:
    here = _module_name(path, root)
    where = path.relative_to(root.parent)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    problems = []
    for line, module, names in _imports(path, root):
        if not module.startswith("vilbert"):
            continue
        if module.startswith("vilbert.cli") and not here.startswith("vilbert.cli") and here != "vilbert.__main__":
            problems.append(f"{where}:{line} imports {module} from outside vilbert/cli")
        private = [n for n in names if _private(n)]
        if private and module != here:
            problems.append(f"{where}:{line} imports {module}'s private {', '.join(private)}")
        parts = module.split(".")
        for depth, part in enumerate(parts):
            owner = ".".join(parts[:depth])
            if _private(part) and not (package == owner or package.startswith(owner + ".")):
                problems.append(f"{where}:{line} imports the private module {module} from outside {owner}")
    return problems


def test_no_private_cross_imports_and_no_library_imports_of_the_cli() -> None:
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in _violations(path)]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The walk above must be able to fail: a module with both kinds of bad import is reported twice.
    bad = tmp_path / "vilbert" / "train" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from .pretrain import _effective_config\nfrom vilbert.cli.app import main\n")
    problems = _violations(bad, tmp_path / "vilbert")
    assert len(problems) == 2, problems
    assert "vilbert.train.pretrain's private _effective_config" in problems[0] and "vilbert/cli" in problems[1]
