"""Offline text: docstrings of the Python standard library (via importlib + inspect), one document per
top-level module or package.

Every installation of CPython carries this text, so the corpus needs no download. It depends on the Python
version (recorded in the dataset's recipe.json), not on anything random: modules are visited in sorted order
and members in definition order.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings
from dataclasses import dataclass, field

# Modules that open windows, print on import, are platform-specific or are test suites.
_SKIP_TOP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3", "ensurepip",
    "venv", "msilib", "winreg", "winsound", "nt", "msvcrt", "test", "sqlite3.test", "ctypes.test",
}
_SKIP_PART = {"test", "tests", "__main__", "idle_test"}


@dataclass
class Section:
    title: str  # qualified name, e.g. "json.dumps"
    text: str  # cleaned docstring (paragraphs separated by blank lines)


@dataclass
class Document:
    doc_id: str  # top-level module / package name: the unit of the train/val/test split
    sections: list[Section] = field(default_factory=list)

    @property
    def n_chars(self) -> int:
        return sum(len(s.text) for s in self.sections)


def clean_docstring(doc: str) -> str:
    """Collapse each paragraph to one line of text; drop doctest prompts and reST markup noise."""
    paras = []
    for para in re.split(r"\n\s*\n", doc.strip()):
        lines = [ln.strip() for ln in para.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith((">>>", "...", "..", "::"))]
        text = " ".join(lines)
        text = re.sub(r"[`*]+", "", text)
        text = re.sub(r":(?:func|class|meth|mod|attr|data|exc|const|ref|term|pep|rfc):", "", text)
        text = re.sub(r"\s+", " ", text).strip()
        if len(text) >= 20:
            paras.append(text)
    return "\n\n".join(paras)


def _quiet_import(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - some modules raise SystemExit or platform errors on import
            return None


def _module_names() -> list[str]:
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIP_TOP:
            continue
        mod = _quiet_import(top)
        if mod is None:
            continue
        names.append(top)
        path = getattr(mod, "__path__", None)
        if path is None:
            continue
        for info in sorted(pkgutil.walk_packages(path, prefix=top + ".", onerror=lambda _n: None), key=lambda i: i.name):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in _SKIP_PART for p in parts[1:]) or info.name in _SKIP_TOP:
                continue
            names.append(info.name)
    return names


def _sections_of(modname: str, seen: set[int]) -> list[Section]:
    mod = _quiet_import(modname)
    if mod is None:
        return []
    out = []

    def add(title: str, obj) -> None:
        try:
            doc = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001
            return
        if not doc or len(doc) < 60:
            return
        text = clean_docstring(doc)
        h = hash(text)
        if len(text) < 60 or h in seen:  # inherited / re-exported docstrings appear once
            return
        seen.add(h)
        out.append(Section(title, text))

    add(modname, mod)
    for name, obj in list(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            add(f"{modname}.{name}", obj)
            for mname, member in list(vars(obj).items()):
                if mname.startswith("_") or not (inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                                                 or isinstance(member, (property, classmethod, staticmethod))):
                    continue
                add(f"{modname}.{name}.{mname}", getattr(member, "__func__", member))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(f"{modname}.{name}", obj)
    return out


def stdlib_documents(min_chars: int = 1500) -> list[Document]:
    """One Document per top-level stdlib module/package (submodules folded in), sorted by name; documents with
    fewer than `min_chars` characters of docstrings are dropped."""
    docs: dict[str, Document] = {}
    seen: set[int] = set()
    for name in _module_names():
        top = name.split(".")[0]
        secs = _sections_of(name, seen)
        if secs:
            docs.setdefault(top, Document(top)).sections.extend(secs)
    return [d for _, d in sorted(docs.items()) if d.n_chars >= min_chars]
