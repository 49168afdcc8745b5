"""Serving modules to contexts whose runtime was shipped to them.

Every process that starts such a context has one :class:`ModuleServer` (per
router). The root finds modules on its own disk; a shipped context serves its
own children from what it was sent, and forwards what it lacks to its parent,
so that a grandchild's request travels up through its intermediaries and each
of them keeps what passed (Mitogen's ``GET_MODULE`` / ``FORWARD_MODULE``).

Each link to such a child has a :class:`Pusher`: it remembers what it has sent
over that link (the cache per connection) and, before any pickled message goes
down the link, sends the modules the pickle refers to and what they import, so
that the child never has to wait for a module on its event loop's thread.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import attrs
import trio

from . import _importer, _wire
from ._asking import OnCancel
from ._errors import ContextError, LinkClosed, WireError
from ._importer import MISSING, SHIPPED_MAIN, ModuleRecord
from ._process import Spawned, preload_module
from ._remote import failed
from ._router import Route, Router
from ._spec import Bootstrap, main_module_spec
from ._wire import Handle, Message

log = logging.getLogger("nursery_procs.modules")

#: The module a shipped runtime starts from; the runtime bundle is what it imports.
RUNTIME_ENTRY: Final = "nursery_procs._bootstrap_remote"
#: Modules of the runtime that its entry does not import: a child's entry on
#: the host it was shipped to, and what replaces a C extension missing there
#: (a parent that has the extension never imports it).
RUNTIME_EXTRAS: Final = ("nursery_procs._child", "msgpack.fallback")
#: The part of a LOAD_MODULE message that is not records (envelope, framing).
_OVERHEAD: Final = 1024

_SERVERS: trio.lowlevel.RunVar[ModuleServer] = trio.lowlevel.RunVar("nursery_procs.modules")


def server_for(router: Router) -> ModuleServer:
    """This process's module server (made, and its handler registered, on first use)."""
    try:
        server = _SERVERS.get()
    except LookupError:
        server = None
    if server is None or server.router is not router:
        server = ModuleServer(router)
        _SERVERS.set(server)
    return server


class ModuleServer:
    """Finds and serves modules for the shipped children of one router."""

    def __init__(self, router: Router) -> None:
        self.router = router
        #: Where modules come from in a shipped runtime (its cache); ``None`` at a
        #: root, which reads them from its own disk.
        self.importer = _importer.installed()
        #: Where requests forwarded to the parent run (set in a shipped runtime).
        self.nursery: trio.Nursery | None = None
        self._found: dict[tuple[str, bool], ModuleRecord] = {}
        self._imports: dict[tuple[str, bool], frozenset[str]] = {}
        self._bundles: dict[bool, tuple[frozenset[str], bytes]] = {}
        #: Bytes of module records sent by this process, bundles included.
        self.bytes_sent = 0
        router.add_handler(Handle.GET_MODULE, self._on_get_module)

    # -- finding -------------------------------------------------------------

    def main_name(self) -> str | None:
        """The name under which this process's main module is shipped."""
        spec = main_module_spec()
        if spec is None:
            return None
        kind, where = spec
        return SHIPPED_MAIN if kind == "path" else where

    def record(self, name: str, *, code: bool = False) -> ModuleRecord | None:
        """The record for *name*, or ``None`` if only the parent may know it."""
        if self.importer is not None:
            return self.importer.records.get(name)
        found = self._found.get((name, code))
        if found is None:
            found = self._find(name, code=code)
            self._found[(name, code)] = found
        return found

    def _find(self, name: str, *, code: bool) -> ModuleRecord:
        spec = main_module_spec()
        if name == SHIPPED_MAIN and spec is not None and spec[0] == "path":
            return _importer.record_from_file(SHIPPED_MAIN, spec[1])
        return _importer.find_record(name, code=code)

    def _available(self, name: str) -> bool:
        """Whether a module some shipped module imports should go with it: it is
        in use here (Mitogen's rule: what the parent has not imported, it has
        no reason to think the child needs)."""
        if self.importer is not None:
            return name in self.importer.records
        return name in sys.modules

    def imports_of(self, record: ModuleRecord, *, in_functions: bool = True) -> frozenset[str]:
        key = (record.name, in_functions)
        names = self._imports.get(key)
        if names is None:
            if self.importer is None and record.kind == _importer.SOURCE:
                # Scanning compiled code read from this host's bytecode cache is
                # much cheaper than compiling the source again.
                compiled = self.record(record.name, code=True)
                if compiled is not None and compiled.kind == _importer.CODE:
                    record = compiled
            names = frozenset(_importer.imported_names(record, in_functions=in_functions))
            self._imports[key] = names
        return names

    def closure(
        self,
        names: Iterable[str],
        sent: set[str],
        *,
        code: bool = False,
        in_functions: bool = True,
    ) -> tuple[list[ModuleRecord], list[str]]:
        """The records to send for *names* over a link that has had *sent*: each
        module, its parent packages and what it imports (if available here; in
        its functions too, if *in_functions*), less the standard library and what
        was sent. Returns them and the names this process does not know (for its
        parent to answer)."""
        out: list[ModuleRecord] = []
        unknown: list[str] = []
        queue = [(self._shipped_name(name), True) for name in names]
        while queue:
            name, asked = queue.pop()
            if name is None or name in sent or _importer.is_stdlib(name):
                continue
            if not asked and not self._available(name):
                continue
            record = self.record(name, code=code)
            if record is None:
                if asked:
                    unknown.append(name)
                continue
            sent.add(name)
            out.append(record)
            parts = name.split(".")
            queue.extend((".".join(parts[:i]), True) for i in range(1, len(parts)))
            if record.kind != MISSING:
                imports = self.imports_of(record, in_functions=in_functions)
                queue.extend((n, False) for n in imports)
        return out, unknown

    def _shipped_name(self, name: str) -> str | None:
        """The name a module is shipped as: a pickle refers to the main script
        as ``__main__`` (or ``__mp_main__`` in a child)."""
        if name in ("__main__", "__mp_main__"):
            return self.main_name()
        return name

    # -- the runtime bundle ------------------------------------------------

    def runtime_bundle(self, *, code: bool) -> tuple[frozenset[str], bytes]:
        """The runtime's modules: their names, and their records compressed (as
        code objects if *code*), made once. The import hook itself travels as
        the bootstrap's second stage, not in the bundle."""
        bundle = self._bundles.get(code)
        if bundle is None:
            import importlib

            importlib.import_module(RUNTIME_ENTRY)  # a layer above this one
            sent = {_importer.__name__}
            # What importing the runtime imports: not what its functions may
            # import at run time (a test run's pytest, say), which is fetched if
            # it is ever needed.
            records, _ = self.closure(
                [RUNTIME_ENTRY, *RUNTIME_EXTRAS], sent, code=code, in_functions=False
            )
            bundle = (frozenset(sent), _importer.encode_records(records))
            self._bundles[code] = bundle
        return bundle

    # -- serving -------------------------------------------------------------

    def _on_get_module(self, msg: Message, route: Route | None) -> Awaitable[None] | None:
        pusher = route.module_pusher if route is not None else None
        if route is None or not isinstance(pusher, Pusher) or msg.src_id != route.peer_id:
            return self.router.send_dead(
                msg, f"context {self.router.id} serves modules only to its shipped children"
            )
        if not route.trusted:
            return self.router.send_dead(msg, "modules are not served to untrusted contexts")
        try:
            name = _wire.decode(msg)
            if not isinstance(name, str) or not name:
                raise ValueError(f"a module name is a string, not {name!r:.80}")
        except (WireError, ValueError) as exc:
            return self._reply(msg, failed(ValueError(str(exc)), data_only=True))
        records, unknown = self.closure([name], pusher.sent)
        if unknown and self.nursery is not None and self.router.parent_route is not None:
            self.nursery.start_soon(self._forward, msg, pusher, name, records)
            return None
        if unknown:
            records.append(_importer.missing(name, "the parent cannot import it either"))
            pusher.sent.add(name)
        return self._reply(msg, (True, [tuple(r) for r in records]))

    async def _forward(
        self, msg: Message, pusher: Pusher, name: str, records: list[ModuleRecord]
    ) -> None:
        """Ask this context's parent for what a child asked and this one lacks."""
        assert self.importer is not None and self.router.parent_route is not None
        try:
            fetched = await fetch_from_parent(self.router, name)
        except (ContextError, LinkClosed, WireError, ValueError) as exc:
            fetched = [_importer.missing(name, f"it could not be fetched: {exc}")]
        self.importer.add(fetched)
        more, _ = self.closure([name], pusher.sent)
        await self._reply(msg, (True, [tuple(r) for r in [*records, *more]]))

    async def _reply(self, msg: Message, outcome: tuple[Any, Any]) -> None:
        reply = _wire.make_data(msg.src_id, self.router.id, msg.reply_to, outcome)
        self.bytes_sent += len(reply.data)
        await self.router.send_or_drop(reply)


async def fetch_from_parent(router: Router, name: str) -> list[ModuleRecord]:
    """Ask this context's parent for *name* (and what it imports)."""
    assert router.parent_route is not None
    got = await router.asking.request(
        router.parent_route.peer_id, Handle.GET_MODULE, name, data=True, on_cancel=OnCancel.ABANDON
    )
    if not isinstance(got, list):
        raise ValueError(f"malformed module reply for {name!r}")
    return [ModuleRecord.from_data(item) for item in got]


@attrs.define(eq=False)
class Pusher:
    """Sends modules down one link ahead of the pickles that need them."""

    server: ModuleServer
    #: Modules this link has had (the cache per connection).
    sent: set[str]
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def send_pickle(self, route: Route, header: bytes, msg: Message) -> None:
        # One at a time: a message must not overtake the modules another one's
        # sender is still sending.
        async with self._lock:
            names = _importer.pickle_modules(msg.data)
            if names:
                await self.push(route, names)
            await route.link.send(header, msg.data)

    async def push(self, route: Route, names: Iterable[str]) -> None:
        """Send *names* (with what they import) unless this link has had them."""
        records, _ = self.server.closure(names, self.sent)
        for batch in _batches(records, route.link.max_message_size - _OVERHEAD):
            load = _wire.make_data(route.peer_id, self.server.router.id, Handle.LOAD_MODULE, batch)
            self.server.bytes_sent += len(load.data)
            await route.link.send(_wire.pack(load))


def _batches(records: list[ModuleRecord], limit: int) -> Iterable[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    size = 0
    for record in records:
        length = len(record.payload) + len(record.filename) + len(record.name) + 16
        if batch and size + length > limit:
            yield batch
            batch, size = [], 0
        batch.append(tuple(record))
        size += length
    if batch:
        yield batch


class Shipping:
    """What a parent does for one child whose runtime it ships (or shipped, to
    the context that starts this child on its host): adapt the child's
    bootstrap, send the modules its target needs with it, and push modules down
    its link afterwards."""

    def __init__(
        self,
        server: ModuleServer,
        *,
        bundle: Iterable[str],
        preload: Iterable[str] = (),
        other_host: bool,
    ) -> None:
        self.server = server
        self.pusher = Pusher(server, set(bundle))
        self.preload = tuple(preload)
        self.other_host = other_host
        self._before_link: Callable[[], Awaitable[None]] | None = None

    def set_before_link(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run *step* on the child's stream before the link's handshake."""
        self._before_link = step

    async def before_link(self) -> None:
        if self._before_link is not None:
            await self._before_link()

    def bootstrap(self, boot: Bootstrap) -> Bootstrap:
        """*boot* as this child needs it: no paths of this host if it runs on
        another one, the main script shipped by name, and the modules its target
        refers to (with the preload list) sent ahead."""
        names = [*map(preload_module, self.preload), *_importer.pickle_modules(boot.target_blob)]
        string_target = _importer.string_target_module(boot.target_blob)
        if string_target is not None:
            names.append(string_target)
        main_module = boot.main_module
        if main_module is not None and main_module[0] == "path":
            main_module = ("module", SHIPPED_MAIN)
        records, _ = self.server.closure(names, self.pusher.sent)
        self.server.bytes_sent += sum(len(r.payload) for r in records)
        return attrs.evolve(
            boot,
            sys_path=() if self.other_host else boot.sys_path,
            main_module=main_module,
            modules=tuple(tuple(r) for r in records),
        )

    def attach(self, route: Route) -> None:
        route.module_pusher = self.pusher


@attrs.define(eq=False)
class ShippedSpawn(Spawned):
    """A started child whose runtime is shipped to it."""

    shipping: Shipping = attrs.field(kw_only=True)


# -- the child's side ----------------------------------------------------------------


def attach_runtime(
    router: Router, route: Route, nursery: trio.Nursery, modules: Iterable[Any]
) -> None:
    """In a child: take the modules sent ahead, and if this runtime was shipped,
    accept modules pushed by the parent, fetch missing ones from it, and serve
    this context's own children (the requests they forward run in *nursery*)."""
    importer = _importer.installed()
    if importer is None:
        return
    importer.add(ModuleRecord.from_data(item) for item in modules)
    token = trio.lowlevel.current_trio_token()

    def fetch(name: str) -> list[ModuleRecord]:
        return trio.from_thread.run(fetch_from_parent, router, name, trio_token=token)

    def on_load(msg: Message, from_route: Route | None) -> None:
        if from_route is not route:
            log.warning("modules pushed by context %d, not the parent, were ignored", msg.src_id)
            return
        try:
            importer.add(ModuleRecord.from_data(item) for item in _wire.decode(msg))
        except (WireError, ValueError, TypeError) as exc:
            log.warning("malformed modules pushed by the parent: %s", exc)

    importer.fetch = fetch
    importer.loop_thread = threading.get_ident()
    router.add_handler(Handle.LOAD_MODULE, on_load)
    server_for(router).nursery = nursery


def local_shipping(router: Router) -> Shipping | None:
    """In a context whose runtime was shipped to its host: what it does for a
    child it starts there (which gets the same runtime; see
    :func:`~nursery_procs._process.runtime_command`). ``None`` elsewhere."""
    importer = _importer.installed()
    if importer is None:
        return None
    return Shipping(server_for(router), bundle=importer.bundle_names, other_host=False)
