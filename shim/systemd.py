"""systemd's user manager over D-Bus, from trio, with jeepney.

Only what the gateway needs: start a transient unit (optionally in a slice),
stop it, read its state and memory, and follow its changes through signals
(no polling).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from jeepney import (
    DBusAddress,
    DBusErrorResponse,
    HeaderFields,
    MatchRule,
    Message,
    message_bus,
    new_method_call,
)
from jeepney.io.trio import DBusRouter, open_dbus_router
from jeepney.wrappers import Properties, unwrap_msg

log = logging.getLogger("vllm_gateway.systemd")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
SLICE_IFACE = "org.freedesktop.systemd1.Slice"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
# The interface that holds ControlGroup and MemoryCurrent, by unit type: each
# unit type that can have a cgroup has its own (not org.freedesktop.systemd1.Unit).
CGROUP_IFACES = {
    ".service": SERVICE_IFACE,
    ".slice": SLICE_IFACE,
    ".scope": "org.freedesktop.systemd1.Scope",
    ".socket": "org.freedesktop.systemd1.Socket",
    ".mount": "org.freedesktop.systemd1.Mount",
    ".swap": "org.freedesktop.systemd1.Swap",
}
# systemd's "no value" for a uint64 property such as MemoryCurrent (no memory accounting).
NOT_SET = 2**64 - 1
MANAGER = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD, interface=MANAGER_IFACE)

GONE = "gone"  # our name for the active state of a unit that is not loaded
# D-Bus errors that mean "systemd is not on the bus right now" (it re-executes
# itself): the call is retried until it is back, for at most this long.
_AWAY_ERRORS = ("ServiceUnknown", "NameHasNoOwner", "NoReply", "Disconnected")
SYSTEMD_BACK_S = 90.0
# Signals waiting to be read by one watcher: a start or a stop sends about ten;
# the router drops what does not fit.
SIGNAL_QUEUE = 1024
# How often a call is retried while systemd is away; a reexec takes ~0.1-1 s.
_AWAY_RETRY_S = 0.2


class SystemdError(Exception):
    """A D-Bus call to systemd failed; the message names the call and the D-Bus error."""

    def __init__(self, call: str, name: str, detail: str) -> None:
        super().__init__(f"systemd {call}: {name}: {detail}")
        self.name = name


def unit_path(unit: str) -> str:
    """The object path systemd gives a unit (sd_bus_path_encode)."""
    out = []
    for i, ch in enumerate(unit):
        if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return f"{MANAGER_PATH}/unit/{''.join(out)}"


def session_bus_address() -> str:
    """The session bus, also when only XDG_RUNTIME_DIR is known (as in some units)."""
    addr = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if addr:
        return addr
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix:path={runtime}/bus"


# ---- what `Systemd.watch` reports of a unit ----


@dataclass(frozen=True)
class ActiveStateChanged:
    """The unit's ActiveState changed (active, activating, deactivating, ...)."""

    active_state: str


@dataclass(frozen=True)
class UnitRemoved:
    """systemd unloaded the unit. Not proof that it is gone: a daemon-reload
    unloads and loads every unit again, and says so for each."""


@dataclass(frozen=True)
class JobDone:
    """A job for the unit finished: `result` is systemd's (done, canceled,
    failed, ...), `job` its D-Bus path."""

    result: str
    job: str


@dataclass(frozen=True)
class MainExited:
    """How the unit's main process ended (ExecMainCode, ExecMainStatus), read
    at once: a failed transient unit is unloaded right after."""

    code: int
    status: int


@dataclass(frozen=True)
class ManagerBack:
    """The manager came back on the bus (after `systemctl --user
    daemon-reexec`, or a restart of the manager): signals may have been
    missed, so read the state again."""


UnitSignal = ActiveStateChanged | UnitRemoved | JobDone | MainExited | ManagerBack


@dataclass(frozen=True)
class UnitState:
    active_state: str  # active, activating, deactivating, inactive, failed, or GONE
    sub_state: str = ""
    result: str = ""
    main_pid: int = 0
    control_group: str = ""
    status_text: str = ""
    # CLOCK_REALTIME microseconds, 0 when never
    active_enter_us: int = 0
    inactive_enter_us: int = 0
    # how the main process ended last (a CLD_* code, and its exit status)
    exec_main_code: int = 0
    exec_main_status: int = 0

    @property
    def running(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")


@dataclass(frozen=True)
class TransientService:
    name: str
    argv: Sequence[str]
    environment: Mapping[str, str]
    description: str
    stop_timeout_s: float
    syslog_identifier: str
    # e.g. "vllm.slice": the engines in one slice can be measured together.
    # systemd makes the slice on demand; a dash nests it ("a-b.slice" in "a.slice").
    slice: str | None = None
    # units started with this one and kept only while something wants them
    # (the idle timer, which has StopWhenUnneeded=yes); a missing one is skipped
    wants: Sequence[str] = ()

    def properties(self) -> list[tuple[str, tuple[str, Any]]]:
        exe = self.argv[0]
        if "/" not in exe:
            exe = shutil.which(exe) or exe
        props: list[tuple[str, tuple[str, Any]]] = [
            ("Description", ("s", self.description)),
            ("ExecStart", ("a(sasb)", [(exe, list(self.argv), False)])),
            ("Environment", ("as", [f"{k}={v}" for k, v in self.environment.items()])),
            # "exec": the start job fails at once when the binary cannot run.
            ("Type", ("s", "exec")),
            # vLLM's worker processes hold VRAM: they must die with the unit.
            ("KillMode", ("s", "control-group")),
            ("TimeoutStopUSec", ("t", int(self.stop_timeout_s * 1_000_000))),
            # A failed engine is unloaded at once, so the next start is clean.
            ("CollectMode", ("s", "inactive-or-failed")),
            ("SyslogIdentifier", ("s", self.syslog_identifier)),
            ("StandardOutput", ("s", "journal")),
            ("StandardError", ("s", "journal")),
        ]
        if self.slice:
            props.append(("Slice", ("s", self.slice)))
        if self.wants:
            props.append(("Wants", ("as", list(self.wants))))
        return props


class Systemd:
    """A connection to the user manager. Use `connect()`."""

    def __init__(self, router: DBusRouter) -> None:
        self.router = router

    async def _call(self, msg: Message, what: str) -> tuple[Any, ...]:
        try:
            reply = await self.router.send_and_get_reply(msg)
            body: tuple[Any, ...] = unwrap_msg(reply)
            return body
        except DBusErrorResponse as e:
            detail = e.data[0] if e.data else ""
            raise SystemdError(what, e.name, str(detail)) from None

    async def subscribe(self) -> None:
        """Ask systemd to emit unit signals (it stays quiet for nobody)."""
        try:
            await self._call(new_method_call(MANAGER, "Subscribe"), "Subscribe")
        except SystemdError as e:
            # a re-executed manager keeps its subscribers
            if not e.name.endswith("AlreadySubscribed"):
                raise

    async def get_unit(self, unit: str) -> str | None:
        try:
            (path,) = await self._call(new_method_call(MANAGER, "GetUnit", "s", (unit,)), "GetUnit")
        except SystemdError as e:
            if e.name.endswith("NoSuchUnit"):
                return None
            raise
        return str(path)

    async def unit_state(self, unit: str) -> UnitState:
        """The unit's state now; GONE when it is not loaded. While the manager
        re-executes itself (off the bus for a moment), waits until it answers."""
        deadline = trio.current_time() + SYSTEMD_BACK_S
        while True:
            try:
                return await self._unit_state(unit)
            except SystemdError as e:
                if not e.name.endswith(_AWAY_ERRORS) or trio.current_time() > deadline:
                    raise
                log.info("systemd is not on the bus (%s); asking again", e.name)
            await trio.sleep(_AWAY_RETRY_S)

    async def _unit_state(self, unit: str) -> UnitState:
        path = await self.get_unit(unit)
        if path is None:
            return UnitState(GONE)
        u = await self._get_all(path, UNIT_IFACE)
        s = await self._get_all(path, SERVICE_IFACE) if unit.endswith(".service") else {}
        if u.get("LoadState") == "not-found":
            return UnitState(GONE)
        return UnitState(
            active_state=str(u.get("ActiveState", GONE)),
            sub_state=str(u.get("SubState", "")),
            result=str(s.get("Result", "")),
            main_pid=int(s.get("MainPID", 0)),
            control_group=str(s.get("ControlGroup", "")),
            status_text=str(s.get("StatusText", "")),
            active_enter_us=int(u.get("ActiveEnterTimestamp", 0)),
            inactive_enter_us=int(u.get("InactiveEnterTimestamp", 0)),
            exec_main_code=int(s.get("ExecMainCode", 0)),
            exec_main_status=int(s.get("ExecMainStatus", 0)),
        )

    async def _get_all(self, path: str, iface: str) -> dict[str, Any]:
        addr = DBusAddress(path, bus_name=SYSTEMD, interface=iface)
        try:
            (props,) = await self._call(Properties(addr).get_all(), f"GetAll {iface}")
        except SystemdError as e:
            if e.name.endswith("UnknownObject") or e.name.endswith("NoSuchUnit"):
                return {}
            raise
        return {k: v[1] for k, v in props.items()}

    async def _cgroup_property(self, unit: str, name: str) -> Any | None:
        """A property of the unit's cgroup interface; None when the unit is not
        loaded, its type has no cgroup, or it went away between the two calls."""
        iface = CGROUP_IFACES.get(unit[unit.rfind("."):]) if "." in unit else None
        if iface is None:
            return None
        path = await self.get_unit(unit)
        if path is None:
            return None
        addr = DBusAddress(path, bus_name=SYSTEMD, interface=iface)
        try:
            ((_sig, value),) = await self._call(Properties(addr).get(name), f"Get {unit} {name}")
        except SystemdError as e:
            if e.name.endswith(("UnknownObject", "NoSuchUnit", "UnknownProperty", "UnknownInterface")):
                return None
            raise
        return value

    async def memory_current(self, unit: str) -> int | None:
        """The bytes the unit's cgroup holds now (a service, or a slice with all
        below it); None when it is not loaded or memory accounting gives nothing."""
        value = await self._cgroup_property(unit, "MemoryCurrent")
        if value is None or int(value) == NOT_SET:
            return None
        return int(value)

    async def control_group(self, unit: str) -> str:
        """The unit's cgroup path as the manager sees it ("/app.slice/x.service");
        "" when it is not loaded or has no cgroup (yet)."""
        value = await self._cgroup_property(unit, "ControlGroup")
        return str(value) if value else ""

    async def start_transient(self, svc: TransientService) -> str:
        (job,) = await self._call(
            new_method_call(
                MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                (svc.name, "fail", svc.properties(), []),
            ),
            f"StartTransientUnit {svc.name}",
        )
        return str(job)

    async def list_units(self, *patterns: str) -> list[tuple[str, str, str]]:
        """Loaded units whose names match the glob `patterns`: (name, description, active state)."""
        msg = new_method_call(MANAGER, "ListUnitsByPatterns", "asas", ([], list(patterns)))
        (units,) = await self._call(msg, "ListUnitsByPatterns")
        return [(str(u[0]), str(u[1]), str(u[3])) for u in units]

    async def stop_unit(self, unit: str) -> None:
        try:
            msg = new_method_call(MANAGER, "StopUnit", "ss", (unit, "replace"))
            await self._call(msg, f"StopUnit {unit}")
        except SystemdError as e:
            if not e.name.endswith("NoSuchUnit"):
                raise

    async def reset_failed(self, unit: str) -> None:
        try:
            await self._call(
                new_method_call(MANAGER, "ResetFailedUnit", "s", (unit,)), f"ResetFailedUnit {unit}"
            )
        except SystemdError as e:
            if not e.name.endswith("NoSuchUnit"):
                raise

    async def add_match(self, rule: MatchRule) -> None:
        await self._call(message_bus.AddMatch(rule), "AddMatch")

    @asynccontextmanager
    async def watch(self, unit: str) -> AsyncIterator[trio.MemoryReceiveChannel[UnitSignal]]:
        """Yield a channel that receives what happens to the unit (a
        `UnitSignal`), in the order systemd emitted it.

        UnitRemoved does not prove that the unit is gone: whoever reads it
        asks for the unit's state (`unit_state`) before acting."""
        path = unit_path(unit)
        send, recv = trio.open_memory_channel[UnitSignal](256)
        rules = [
            MatchRule(type="signal", interface=PROPS_IFACE, member="PropertiesChanged", path=path),
            MatchRule(type="signal", interface=MANAGER_IFACE, member="UnitRemoved", path=MANAGER_PATH),
            MatchRule(type="signal", interface=MANAGER_IFACE, member="JobRemoved", path=MANAGER_PATH),
        ]
        for rule in rules:
            # the bus needs the sender; jeepney's local filter must not have it,
            # since messages carry systemd's unique name
            await self.add_match(MatchRule(type="signal", sender=SYSTEMD, **rule.header_fields))
        owner = MatchRule(type="signal", sender=message_bus.bus_name, interface=message_bus.interface,
                          member="NameOwnerChanged", path=message_bus.object_path)
        owner.add_arg_condition(0, SYSTEMD)
        await self.add_match(owner)
        rules.append(owner)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, rules, unit, send)
            try:
                yield recv
            finally:
                nursery.cancel_scope.cancel()

    async def _pump(self, rules: list[MatchRule], unit: str, out: trio.MemorySendChannel[UnitSignal]) -> None:
        # One queue for every signal, so that they come out in the order
        # systemd sent them (e.g. the exit status before the failed job).
        with self.router.filter(MatchRule(type="signal"), bufsize=SIGNAL_QUEUE) as queue:
            while True:
                msg = await queue.receive()
                if not any(rule.matches(msg) for rule in rules):
                    continue
                member = msg.header.fields.get(HeaderFields.member)
                if member == "PropertiesChanged":
                    iface, changed, _invalidated = msg.body
                    if iface == UNIT_IFACE and "ActiveState" in changed:
                        await out.send(ActiveStateChanged(str(changed["ActiveState"][1])))
                    elif iface == SERVICE_IFACE and "ExecMainStatus" in changed and "ExecMainCode" in changed:
                        # read now: a failed transient unit is unloaded at once
                        code, status = changed["ExecMainCode"][1], changed["ExecMainStatus"][1]
                        await out.send(MainExited(int(code), int(status)))
                elif member == "UnitRemoved" and msg.body[0] == unit:
                    await out.send(UnitRemoved())
                elif member == "JobRemoved" and msg.body[2] == unit:
                    await out.send(JobDone(str(msg.body[3]), str(msg.body[1])))
                elif member == "NameOwnerChanged" and msg.body[2]:
                    log.info("systemd is back on the bus as %s; subscribing again", msg.body[2])
                    try:
                        await self.subscribe()
                    except SystemdError as e:
                        log.warning("cannot subscribe to systemd's signals again: %s", e)
                    await out.send(ManagerBack())


@asynccontextmanager
async def connect() -> AsyncIterator[Systemd]:
    async with open_dbus_router(session_bus_address()) as router:
        sd = Systemd(router)
        await sd.subscribe()
        yield sd
