"""Shipping pure-Python modules to a context that cannot import them from its disk.

A context on another host runs a Python that has neither nursery_procs nor its
dependencies. Its parent sends the modules it needs, as Mitogen's master does:

* the *runtime bundle* (nursery_procs, trio and their pure-Python dependencies)
  right after the interpreter starts, before anything else is imported;
* the modules a target, a call or a message refers to, pushed down the link
  ahead of the message that needs them (``LOAD_MODULE``), with the modules
  they import;
* anything else on request (``GET_MODULE``), through intermediaries.

This module is the part that needs no event loop: module records, the import
hook (a :data:`sys.meta_path` finder and loader), finding the source of a
module on the parent's side, and scanning code and pickles for the modules they
import. It imports only the standard library at the top, because its own source
is also the *second stage* of the bootstrap: :data:`STAGE1`, run as
``python -c``, reads it and runs :func:`stage2` before nursery_procs can be
imported on that host.
"""

from __future__ import annotations

import dis
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import marshal
import os
import pickletools
import sys
import threading
import types
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

#: The name under which a parent's main script is shipped (its ``__main__``
#: cannot be imported by that name on the other side).
SHIPPED_MAIN = "__nursery_procs_main__"

#: Record kinds: the payload is source text (UTF-8), a marshalled code object
#: (only between interpreters with the same bytecode magic number), or the
#: reason why the module cannot be shipped.
SOURCE = 0
CODE = 1
MISSING = 2
_KINDS = (SOURCE, CODE, MISSING)

#: The line a shipped runtime writes on its standard output before anything
#: else, so that its parent knows it started: ``<marker> <pid> <pgid> <magic>``.
HELLO_MARKER = b"nursery_procs-remote-1"
#: The first stage: checks the Python version (in syntax old interpreters
#: parse), says hello when its input is a pipe from the parent (argument
#: ``-``), or reads its bundle from an inherited file descriptor, then runs
#: the second stage (this module's source). Kept short: it travels on a
#: command line.
STAGE1 = (
    "import os,sys,zlib\n"
    "if sys.version_info<(3,11):os.write(2,('nursery_procs: this host runs Python %s; "
    "3.11 or newer is needed\\n'%sys.version.split()[0]).encode());os._exit(3)\n"
    "def R(f,n):\n"
    " b=b''\n"
    " while len(b)<n:\n"
    "  c=os.read(f,n-len(b))\n"
    "  if not c:os._exit(4)\n"
    "  b+=c\n"
    " return b\n"
    "a=sys.argv[1]\n"
    "if a=='-':\n"
    " import importlib.util as u;f=0\n"
    " os.write(1,b'" + HELLO_MARKER.decode() + " %d %d %s\\n'%(os.getpid(),os.getpgid(0),"
    "u.MAGIC_NUMBER.hex().encode()))\n"
    "else:f=os.open('/proc/self/fd/'+a,os.O_RDONLY)\n"
    "m=sys.modules['nursery_procs._importer']=type(sys)('nursery_procs._importer')\n"
    "s=R(f,int.from_bytes(R(f,8),'big'))\n"
    "exec(zlib.decompress(s),m.__dict__)\n"
    "m.stage2(lambda n:R(f,n),f,a,sys.argv[2:],s)\n"
)
#: Exit statuses of the first stage.
EXIT_PYTHON_TOO_OLD = 3
EXIT_BUNDLE_TRUNCATED = 4


class ModuleRecord(NamedTuple):
    """One module as it travels between contexts (plain data: a tuple)."""

    #: The module's full name.
    name: str
    #: :data:`SOURCE`, :data:`CODE` or :data:`MISSING`.
    kind: int
    #: Whether it is a package (its submodules may be shipped too).
    is_package: bool
    #: Its file name on the parent's side (shown in tracebacks).
    filename: str
    #: Source text, marshalled code, or (for :data:`MISSING`) the reason.
    payload: bytes

    @classmethod
    def from_data(cls, item: object) -> ModuleRecord:
        """Validate one record received as plain data (a list or a tuple)."""
        if not isinstance(item, list | tuple) or len(item) != 5:
            raise ValueError(f"a module record is a 5-tuple, not {item!r:.80}")
        name, kind, is_package, filename, payload = item
        if (
            not isinstance(name, str)
            or not all(part.isidentifier() for part in name.split("."))
            or kind not in _KINDS
            or not isinstance(is_package, bool)
            or not isinstance(filename, str)
            or not isinstance(payload, bytes)
        ):
            raise ValueError(f"malformed module record for {name!r:.80}")
        return cls(name, kind, is_package, filename, payload)

    @property
    def reason(self) -> str:
        return self.payload.decode("utf-8", "replace")


def missing(name: str, reason: str) -> ModuleRecord:
    """A record saying that *name* cannot be shipped, and why."""
    return ModuleRecord(name, MISSING, False, "", reason.encode("utf-8"))


# -- the parent's side: finding what to ship -----------------------------------


def is_stdlib(name: str) -> bool:
    """Whether *name* belongs to the standard library (every host has its own)."""
    top = name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _spec_of(name: str) -> importlib.machinery.ModuleSpec | None:
    module = sys.modules.get(name)
    if module is not None:
        spec: importlib.machinery.ModuleSpec | None = getattr(module, "__spec__", None)
        return spec
    try:
        # Finding a submodule imports its parent packages, as importing would.
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError, SyntaxError):
        return None


def find_record(name: str, *, code: bool) -> ModuleRecord:
    """The record that ships *name* from this process (as code if *code* and
    possible, else as source), or a :data:`MISSING` one saying why it cannot be."""
    spec = _spec_of(name)
    if spec is None:
        return missing(name, "the parent cannot import it either")
    loader = spec.loader
    is_package = spec.submodule_search_locations is not None
    if isinstance(loader, importlib.machinery.ExtensionFileLoader):
        return missing(
            name,
            f"it is an extension module ({spec.origin}), which cannot be shipped: "
            "install it on that host",
        )
    if spec.origin in ("built-in", "frozen"):
        return missing(name, "it is built into the parent's Python, and this one lacks it")
    if spec.origin is None and is_package:  # a namespace package
        return ModuleRecord(name, SOURCE, True, f"<namespace {name}>", b"")
    filename = spec.origin or f"<{name}>"
    try:
        source = _source_of(name, loader, spec)
        if code:
            compiled = _code_of(name, loader, source, filename)
            if compiled is not None:
                return ModuleRecord(name, CODE, is_package, filename, marshal.dumps(compiled))
    except (ImportError, OSError, SyntaxError, UnicodeDecodeError) as exc:
        return missing(name, f"its source cannot be read on the parent: {exc}")
    if source is None:
        return missing(name, f"the parent has no source for it ({filename})")
    return ModuleRecord(name, SOURCE, is_package, filename, source.encode("utf-8"))


def _source_of(name: str, loader: object, spec: importlib.machinery.ModuleSpec) -> str | None:
    get_source = getattr(loader, "get_source", None)
    source: str | None = get_source(name) if get_source is not None else None
    origin = spec.origin
    if source is None and spec.has_location and origin and origin.endswith(".py"):
        # A loader without get_source (pytest's assertion rewriter, for one):
        # the file it loads is the source.
        with open(origin, "rb") as file:
            source = importlib.util.decode_source(file.read())
    return source


def _code_of(name: str, loader: object, source: str | None, filename: str) -> types.CodeType | None:
    if isinstance(
        loader, importlib.machinery.SourceFileLoader | importlib.machinery.SourcelessFileLoader
    ):
        code: types.CodeType | None = loader.get_code(name)  # from the bytecode cache
        return code
    if source is not None:
        return compile(source, filename, "exec", dont_inherit=True)
    return None


def record_from_file(name: str, path: str) -> ModuleRecord:
    """Ship the script at *path* (a parent's ``__main__``) as module *name*."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
        source = importlib.util.decode_source(raw)
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        return missing(name, f"the parent's main script {path} cannot be read: {exc}")
    return ModuleRecord(name, SOURCE, False, path, source.encode("utf-8"))


def code_of(record: ModuleRecord) -> types.CodeType:
    """Compile (or unmarshal) a record's module code."""
    if record.kind == CODE:
        code = marshal.loads(record.payload)
        if not isinstance(code, types.CodeType):
            raise ImportError(f"shipped code for {record.name!r} is not a code object")
        return code
    source = record.payload.decode("utf-8")
    return compile(source, record.filename, "exec", dont_inherit=True)


def _resolve(name: str, level: int, module: str, is_package: bool) -> str | None:
    if level == 0:
        return name
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    if not base:
        return None
    return f"{base}.{name}" if name else base


def _parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


_IMPORT_NAME = dis.opmap["IMPORT_NAME"]
_LOAD_CONST = dis.opmap["LOAD_CONST"]
# Python 3.14 loads small integers (an import's level) with their own opcode.
_LOAD_SMALL_INT = dis.opmap.get("LOAD_SMALL_INT", -1)


def _imports_in(code: types.CodeType) -> Iterator[tuple[str, object, object]]:
    """``(name, level, fromlist)`` of every IMPORT_NAME in *code* (not nested ones).

    A plain walk over the bytecode: :func:`dis.get_instructions` is ten times
    slower, and a parent scans every module it ships.
    """
    raw = code.co_code
    consts = code.co_consts
    last: list[object] = [None, None]
    extended = 0
    for i in range(0, len(raw), 2):
        op = raw[i]
        arg = raw[i + 1] | extended
        if op == dis.EXTENDED_ARG:
            extended = arg << 8
            continue
        extended = 0
        if op == _LOAD_CONST:
            last = [last[1], consts[arg]]
        elif op == _LOAD_SMALL_INT:
            last = [last[1], arg]
        elif op == _IMPORT_NAME:
            yield code.co_names[arg], last[0], last[1]


def _module_level_imports(code: types.CodeType) -> Iterator[tuple[str, object, object]]:
    """Like :func:`_imports_in`, skipping ``if TYPE_CHECKING:`` blocks (imports
    for the type checker, never run)."""
    instructions = list(dis.get_instructions(code))
    last: list[object] = [None, None]
    skip_to = -1
    for ins, following in zip(instructions, [*instructions[1:], None], strict=True):
        if ins.offset < skip_to:
            continue
        if (
            ins.argval == "TYPE_CHECKING"
            and following is not None
            and "JUMP" in following.opname
            and "FALSE" in following.opname
        ):
            skip_to = following.argval
        elif ins.opcode in (_LOAD_CONST, _LOAD_SMALL_INT):
            last = [last[1], ins.argval]
        elif ins.opcode == _IMPORT_NAME:
            yield ins.argval, last[0], last[1]


def imported_names(record: ModuleRecord, *, in_functions: bool = True) -> set[str]:
    """Every module name a module's code may import: its ``import`` statements
    (also those in functions, unless not *in_functions*; never those under ``if
    TYPE_CHECKING:``), relative ones resolved, with ``from x import y`` counted
    as ``x.y`` as well (``y`` may be a submodule), and their parent packages."""
    if record.kind == MISSING:
        return set()
    try:
        top = code_of(record)
    except (SyntaxError, ValueError, ImportError):
        return set()
    names: set[str] = set()
    pending = [top]
    while pending:
        code = pending.pop()
        function = bool(code.co_flags & inspect.CO_NEWLOCALS)
        found = _imports_in(code) if function else _module_level_imports(code)
        for name, level, fromlist in found:
            _add_import(names, name, level, fromlist, record)
        nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
        pending.extend(c for c in nested if in_functions or not c.co_flags & inspect.CO_NEWLOCALS)
    return names


def _add_import(
    names: set[str], name: str, level: object, fromlist: object, record: ModuleRecord
) -> None:
    full = _resolve(name, level if isinstance(level, int) else 0, record.name, record.is_package)
    if not full:
        return
    names.add(full)
    names.update(_parents(full))
    if isinstance(fromlist, tuple):
        names.update(f"{full}.{item}" for item in fromlist if isinstance(item, str) and item != "*")


_STRING_OPS = frozenset(
    (
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "SHORT_BINSTRING",
        "BINSTRING",
        "STRING",
    )
)
# Opcodes that leave the top of the stack as it was.
_NEUTRAL_OPS = frozenset(("PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"))
_GET_OPS = frozenset(("GET", "BINGET", "LONG_BINGET"))


def pickle_modules(data: bytes) -> set[str]:
    """The modules a pickle refers to (its classes and functions), without
    unpickling it.

    Fast path: a protocol 4+ pickle without a ``STACK_GLOBAL`` byte refers to none.
    """
    if len(data) > 1 and data[0] == 0x80 and data[1] >= 4 and b"\x93" not in data:
        return set()
    modules: set[str] = set()
    memo: dict[int, Any] = {}
    recent: list[Any] = [None, None]  # what the last two pushes were, if strings
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                recent = [recent[-1], arg]
            elif name in _GET_OPS:
                recent = [recent[-1], memo.get(arg if isinstance(arg, int) else -1)]
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg if isinstance(arg, int) else -1] = recent[-1]
            elif name == "STACK_GLOBAL":
                if isinstance(recent[0], str):
                    modules.add(recent[0])
                recent = [None, None]
            elif name in ("GLOBAL", "INST"):
                modules.add(str(arg).partition(" ")[0])
                recent = [recent[-1], None]
            elif name not in _NEUTRAL_OPS:
                recent = [recent[-1], None]
    except ValueError:  # not a pickle after all: nothing to ship for it
        pass
    return modules


def string_target_module(blob: bytes) -> str | None:
    """For a pickled ``(target, args)`` whose target is a ``"module:function"``
    string, the module's name."""
    try:
        for op, arg, _pos in pickletools.genops(blob):
            if op.name in ("PROTO", "FRAME"):
                continue
            if op.name in _STRING_OPS and isinstance(arg, str) and ":" in arg:
                return arg.partition(":")[0] or None
            return None
    except ValueError:
        return None
    return None


# -- the bundle's framing --------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """One length-prefixed block, as the first stage reads it."""
    return len(payload).to_bytes(8, "big") + payload


def encode_records(records: Iterable[ModuleRecord]) -> bytes:
    """Compress records for the bundle (marshal of plain tuples: every Python 3
    reads it)."""
    return zlib.compress(marshal.dumps(tuple(tuple(r) for r in records)), 6)


def decode_records(blob: bytes) -> list[ModuleRecord]:
    return [ModuleRecord.from_data(item) for item in marshal.loads(zlib.decompress(blob))]


def stage2_source() -> bytes:
    """This module's source, compressed: the bootstrap's second stage."""
    spec = _spec_of(__name__)
    get_source = getattr(spec.loader if spec is not None else None, "get_source", None)
    source = get_source(__name__) if get_source is not None else None
    if source is None:
        raise RuntimeError("the source of nursery_procs._importer is not available")
    return zlib.compress(source.encode("utf-8"), 9)


# -- the receiving side: the import hook --------------------------------------------


#: How an import asks the parent for a module it lacks: returns the records the
#: parent sent (the module and what it imports), or raises ImportError.
Fetcher = Callable[[str], Sequence[ModuleRecord]]


class Importer(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The import hook of a context whose runtime was shipped to it.

    It sits first in :data:`sys.meta_path` and imports the modules the parent
    shipped (the parent's copy wins over one on this host's disk). A second,
    last finder (:class:`_Fetcher`) asks the parent for a module nobody else
    could find, from threads other than the event loop's (whose link it would
    otherwise wait on); on the event loop's thread the import fails with a
    message saying how to ship the module ahead.
    """

    def __init__(
        self, records: Iterable[ModuleRecord] = (), *, stage2: bytes = b"", bundle: bytes = b""
    ) -> None:
        self.records: dict[str, ModuleRecord] = {}
        #: The bootstrap this runtime came with (compressed second stage and
        #: bundle), for the children it starts on this host.
        self.stage2 = stage2
        self.bundle = bundle
        self._bundle_fd = -1
        #: The names that came in the runtime bundle.
        self.bundle_names: frozenset[str] = frozenset()
        self.fetch: Fetcher | None = None
        #: The thread of the event loop, where imports cannot wait for the parent.
        self.loop_thread: int | None = None
        self._fetcher = _Fetcher(self)
        self.add(records)

    def bundle_file(self) -> int:
        """A memory file holding this runtime's bootstrap, for a child to inherit
        (made on first use, and again in a fork that closed it)."""
        fd = self._bundle_fd
        try:
            if fd >= 0 and os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{_MEMFD}"):
                return fd
        except OSError:
            pass
        self._bundle_fd = _bundle_memfd(self.stage2, self.bundle)
        return self._bundle_fd

    def add(self, records: Iterable[ModuleRecord]) -> None:
        for record in records:
            known = self.records.get(record.name)
            if known is None or known.kind == MISSING:
                self.records[record.name] = record

    def install(self) -> None:
        """Put this importer first and its fetching finder last in :data:`sys.meta_path`."""
        global _installed
        sys.meta_path[:] = [
            self,
            *(f for f in sys.meta_path if not isinstance(f, Importer | _Fetcher)),
            self._fetcher,
        ]
        _installed = self

    # importlib.abc.MetaPathFinder
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        record = self.records.get(fullname)
        if record is None:
            return None
        if record.kind == MISSING:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} on this host, and the parent could not "
                f"ship it: {record.reason}",
                name=fullname,
            )
        spec = importlib.util.spec_from_loader(
            fullname, self, origin=record.filename, is_package=record.is_package
        )
        if spec is not None:
            spec.has_location = not record.filename.startswith("<")
        return spec

    # importlib.abc.Loader
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__spec__.name if module.__spec__ else module.__name__
        exec(self.get_code(name), module.__dict__)

    # what runpy, linecache and inspect ask of a loader
    def get_code(self, fullname: str) -> types.CodeType:
        record = self.records.get(fullname)
        if record is None or record.kind == MISSING:
            raise ImportError(f"{fullname!r} was not shipped here", name=fullname)
        return code_of(record)

    def get_source(self, fullname: str) -> str | None:
        record = self.records.get(fullname)
        if record is None or record.kind != SOURCE:
            return None
        return record.payload.decode("utf-8")

    def is_package(self, fullname: str) -> bool:
        record = self.records.get(fullname)
        return bool(record and record.is_package)


class _Fetcher(importlib.abc.MetaPathFinder):
    """The last finder: asks the parent for a module no other finder found."""

    def __init__(self, importer: Importer) -> None:
        self.importer = importer

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        importer = self.importer
        fetch = importer.fetch
        if fetch is None or is_stdlib(fullname) or not self._from_parent(fullname):
            return None
        if threading.get_ident() == importer.loop_thread:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} on this host. nursery_procs ships the "
                "modules a target, call or message refers to (and what they import) "
                "ahead of it, and fetches others for imports made outside the event "
                "loop's thread; this import ran on it (a run-time import of a module "
                "the parent had not imported): list it in preload= to ship it ahead",
                name=fullname,
            )
        try:
            records = fetch(fullname)
        except Exception as exc:  # whatever stopped the parent from answering
            raise ModuleNotFoundError(
                f"No module named {fullname!r} on this host, and asking the parent for "
                f"it failed: {type(exc).__name__}: {exc}",
                name=fullname,
            ) from exc
        importer.add(records)
        return importer.find_spec(fullname, path, target)

    def _from_parent(self, fullname: str) -> bool:
        """Ask only for top-level modules, and submodules of shipped packages (a
        package from this host's disk keeps its own submodules)."""
        parent = fullname.rpartition(".")[0]
        return not parent or parent in self.importer.records


_installed: Importer | None = None


def installed() -> Importer | None:
    """This process's import hook, if its runtime was shipped to it."""
    return _installed


# -- the second stage of the bootstrap ------------------------------------------


def stage2(
    read: Callable[[int], bytes], fd: int, source: str, argv: list[str], stage2_blob: bytes
) -> None:
    """Run by :data:`STAGE1` (which read *stage2_blob*, this module's compressed
    source, from *fd*): read the runtime bundle, install the import hook, and run
    the runtime (over standard input and output if *source* is ``-``, else as
    ``python -m nursery_procs._child *argv``, with the bundle in inherited file
    descriptor *source*). Never returns."""
    blob = read(int.from_bytes(read(8), "big"))
    if source != "-":
        os.close(fd)
        os.close(int(source))
    records = decode_records(blob)
    importer = Importer(records, stage2=stage2_blob, bundle=blob)
    importer.bundle_names = frozenset(r.name for r in records)
    importer.install()
    # The package is above this module's layer: imported by name.
    package = importlib.import_module("nursery_procs")
    package._importer = sys.modules["nursery_procs._importer"]  # type: ignore[attr-defined]
    # The entry is a layer above this module: imported by name.
    entry = importlib.import_module("nursery_procs._bootstrap_remote")
    entry.main(source == "-", argv)


_MEMFD = "nursery_procs-bundle"


def _bundle_memfd(stage2: bytes, bundle: bytes) -> int:
    """A memory file with the bootstrap, for this runtime's children."""
    fd = os.memfd_create(_MEMFD, os.MFD_CLOEXEC)
    data = frame(stage2) + frame(bundle)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd
