"""Sphinx configuration for the nursery_procs documentation.

Notes for contributors
----------------------

Code blocks. Every code block in ``docs/`` and ``README.md`` is either run by
``tests/test_docs_examples.py`` exactly as written or marked as a fragment; a new block
that is neither fails the tests. Give every block its language (``.. code-block::
python``, ``console``, ``text``, ``toml``, ``json``; no bare ``::`` blocks). Then:

* a complete Python program (its imports, and an ``if __name__ == "__main__":`` guard)
  is run as a script and must exit 0;
* a piece of a larger program, or a command that is only shown, takes the option
  ``:class: fragment`` (in ``README.md``: a ``<!-- fragment -->`` line right above the
  fence), indented as the block's code is; a Python fragment must still compile (as the
  body of an async function), and the page labels it "fragment";
* ``toml`` and ``json`` blocks must parse; ``text`` blocks (output, diagrams) are not code.

References. ``nitpicky`` is on and nothing is suppressed: every cross-reference must
resolve. The build never touches the network: intersphinx reads Python's inventory from
Debian's ``python3-doc`` package (``scripts/quickstart.sh check`` installs it) and Trio's
from ``_inventories/trio.inv``, which ``_inventories/make_trio_inventory.py`` rebuilds
from Trio's own documentation sources (run it after upgrading trio).
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from docutils import nodes as docutils_nodes
from sphinx.ext import intersphinx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nursery_procs._version import __version__  # noqa: E402

project = "nursery_procs"
author = "the nursery_procs authors"
copyright = "2026, the nursery_procs authors"
release = __version__
version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_parser",
]
exclude_patterns = ["_build", "_inventories"]
nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# No autodoc_default_options: with Sphinx 9 a default ``members`` replaces a directive's
# own list. Each directive says which members it shows.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- Inventories: local files only ------------------------------------------------------

PYTHON_INVENTORY = Path("/usr/share/doc/python3/html/objects.inv")


def _python_docs_version(inventory: Path) -> str:
    """The ``X.Y`` an inventory was made for, from its ``# Version:`` header line."""
    if not inventory.is_file():
        raise RuntimeError(
            f"{inventory} is missing: install Debian's python3-doc package "
            "(apt-get install python3-doc; scripts/quickstart.sh check does it)"
        )
    with inventory.open("rb") as file:
        for line in file:
            if line.startswith(b"# Version: "):
                return line.removeprefix(b"# Version: ").decode().strip()
    raise RuntimeError(f"{inventory} has no '# Version:' line")


intersphinx_mapping = {
    "python": (
        f"https://docs.python.org/{_python_docs_version(PYTHON_INVENTORY)}/",
        str(PYTHON_INVENTORY),
    ),
    "trio": ("https://trio.readthedocs.io/en/stable/", str(HERE / "_inventories" / "trio.inv")),
}
intersphinx_timeout = 1  # a file never needs it; a URL slipped in fails fast

# -- HTML ---------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"nursery_procs {release}"
html_static_path = ["_static"]
html_css_files = ["fragment.css"]
pygments_style = "friendly"
pygments_dark_style = "monokai"

# -- The changelog is CHANGELOG.md, read by MyST --------------------------------------------

myst_heading_anchors = 3

# -- Classes users get from a factory: no constructor in the reference ----------------------

#: Users get these from ``open_*`` functions, ``start_child`` and the like (or, for the
#: protocols, only pass objects of that shape); their ``__init__`` takes the runtime's
#: internals, so the reference shows no constructor.
MADE_BY_FACTORIES = {
    "nursery_procs.Supervisor",
    "nursery_procs.Context",
    "nursery_procs.Link",
    "nursery_procs.Pool",
    "nursery_procs.WorkerPool",
    "nursery_procs.SignalShutdown",
    "nursery_procs.testing.FakeProcess",
    "nursery_procs.testing.Snapshot",
    "nursery_procs.testing.LeakReport",
    "nursery_procs._router.Router",
    "nursery_procs._process.ChildProcess",
    "nursery_procs._forward.Source",
    "nursery_procs._forward.Sink",
}


def hide_factory_made_signatures(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: Any, annotation: Any
) -> tuple[str, str] | None:
    if what != "class" or name not in MADE_BY_FACTORIES:
        return None
    # autodoc has noted the constructor's parameters for the description; forget them.
    app.env.current_document.autodoc_annotations.pop(name, None)
    return "", ""


def shield_first_line(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Napoleon reads ``X: Y`` on the first line of an attribute's docstring as "type X,
    description Y". Here types come from annotations and that line is a sentence (a colon
    is ordinary punctuation), so an empty reST comment goes first and napoleon takes the
    comment for the line it splits."""
    if what in ("attribute", "property", "data") and lines and ":" in lines[0]:
        lines[:0] = ["..", ""]


def _type_variables() -> dict[str, str]:
    """Every TypeVar-like in the package's modules that autodoc imported, by qualified and
    by short name, mapped to what it is in :mod:`typing` (``TypeVar``, ``TypeVarTuple``,
    ``ParamSpec``)."""
    kinds = (typing.TypeVar, typing.TypeVarTuple, typing.ParamSpec)
    found: dict[str, str] = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.partition(".")[0] != "nursery_procs":
            continue
        for name, value in vars(module).items():
            if isinstance(value, kinds):
                found[f"{module_name}.{name}"] = found[name] = type(value).__name__
    return found


def link_type_variables(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """A signature's ``T`` or ``Ts`` is no documented object: link it to what it is in
    Python's docs (``typing.TypeVar``, ``typing.TypeVarTuple``), keeping its own name."""
    kind = _type_variables().get(node["reftarget"])
    if node["refdomain"] != "py" or kind is None:
        return None
    redirected = node.deepcopy()
    redirected["reftarget"] = f"typing.{kind}"
    return intersphinx.missing_reference(app, env, redirected, contnode)


def resolve_in_enclosing_packages(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """A docstring in ``nursery_procs.testing`` that says :func:`open_supervisor` means
    ``nursery_procs.open_supervisor``: look a name up in the enclosing packages too, as a
    reader would. Names found nowhere still fail the build."""
    module = node.get("py:module") or ""
    if node["refdomain"] != "py" or not module.startswith("nursery_procs."):
        return None
    domain = env.get_domain("py")
    while "." in module:
        module = module.rpartition(".")[0]
        retry = node.deepcopy()
        retry["py:module"], retry["py:class"] = module, None
        found = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], retry, contnode
        )
        if found is not None:
            return found
    return None


#: Names from other libraries, with the page and anchor their own docs give them (read
#: from their documentation sources: attrs' api.rst, trio-parallel's reference.rst) or,
#: for prometheus-client, whose docs are not made by Sphinx, the page about them.
EXTERNAL_PAGES = {
    "attrs.evolve": "https://www.attrs.org/en/stable/api.html#attrs.evolve",
    "trio_parallel.run_sync": (
        "https://trio-parallel.readthedocs.io/en/stable/reference.html#trio_parallel.run_sync"
    ),
    "trio_parallel.open_worker_context": (
        "https://trio-parallel.readthedocs.io/en/stable/reference.html"
        "#trio_parallel.open_worker_context"
    ),
    "prometheus_client.Counter": "https://prometheus.github.io/client_python/instrumenting/counter/",
    # ``serve_control(collectors=...)``: the annotation names it without its module
    "Collector": "https://prometheus.github.io/client_python/collector/custom/",
    "prometheus_client.registry.Collector": (
        "https://prometheus.github.io/client_python/collector/custom/"
    ),
}


def link_external_pages(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    url = EXTERNAL_PAGES.get(node["reftarget"])
    if node["refdomain"] != "py" or url is None:
        return None
    reference = docutils_nodes.reference("", "", internal=False, refuri=url)
    reference += contnode
    return reference


def setup(app: Any) -> None:
    app.connect("autodoc-process-signature", hide_factory_made_signatures)
    app.connect("missing-reference", link_type_variables)
    app.connect("missing-reference", resolve_in_enclosing_packages)
    app.connect("missing-reference", link_external_pages)
    # before napoleon (priority 500) rewrites the docstring
    app.connect("autodoc-process-docstring", shield_first_line, priority=400)
