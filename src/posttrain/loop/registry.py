"""The version registry of ``posttrain loop``: every adapter that was ever a candidate, which one serves, and an
append-only audit log of every decision.

Layout under the registry root::

    registry.json          {"serving": "v2", "pending": null, "versions": {"v0": {...}, ...}, "state": {...}}
    registry.lock          the cross-process lock every change holds
    versions/v1/           the candidate's adapter (a copy: later runs cannot change what a version is)
    audit.jsonl            one line per event

A version records its parent (the version it was trained from), its status, whether it passed its gates, the
metrics the gates saw, the sha256 of its training data, and the reasons of its decision. Statuses:

- ``candidate``: registered, not yet gated; never serves (unless an operator overrides, audited);
- ``rejected``: failed a gate; never serves, whatever anyone asks;
- ``approved``: passed its gates, waiting for the server to confirm the switch (``pending``);
- ``serving``: the server confirmed it serves it; ``retired``: served before, replaced since.

**Only versions that passed their gates serve** (:meth:`Registry.servable`): ``approved``, ``serving`` and
``retired`` ones, plus candidates an operator explicitly overrode (``rollback --override``, with a reason in the
audit log). The initial version counts as gated: it is the model that served before the loop existed.

**Integrity, with two writers** (the loop and an operator's rollback, or the server confirming at start-up):

1. Every change is a read-modify-write under ``registry.lock`` (a ``filelock`` file lock, which works across
   processes): the file is re-read after the lock is taken, so a writer holding an old copy in memory cannot
   overwrite a newer change, and the audit line is written under the same lock, so the audit log's order is the
   order of the changes.
2. ``registry.json`` is written to a temporary file, fsynced, renamed over the old one, and the folder is fsynced,
   so a crash or power loss leaves either the old or the new file, never a torn or empty one. Audit lines are
   fsynced as written.
3. **Two-phase switches.** A promotion or rollback first records ``pending`` (the version the server should
   serve); only when the server confirms (or there is no server) does :meth:`Registry.confirm` make it
   ``serving``. ``serving`` is therefore always what the server was last confirmed to serve, and a crash between
   the two phases leaves a ``pending`` entry that :func:`posttrain.loop.run.reconcile` finishes (or the server
   finishes at start-up) by asking the server what it serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from posttrain.errors import PosttrainError

# statuses of versions that passed their gates: the only ones a server may serve (module docstring)
GATED = ("approved", "serving", "retired")
LOCK_TIMEOUT_S = 60.0


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """One registry folder. The attributes are a snapshot of ``registry.json``: :meth:`reload` refreshes it, and
    every method that changes the registry refreshes it under the lock first (module point 1)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "registry.json"
        self.audit_path = self.root / "audit.jsonl"
        self._lock = FileLock(str(self.root / "registry.lock"), timeout=LOCK_TIMEOUT_S)
        self.reload()

    # -- persistence ------------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Read ``registry.json`` again (it is replaced atomically, so no lock is needed to read it)."""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError as e:
                raise PosttrainError(f"{self.path}: not a registry file ({e})") from None
        else:
            data = {}
        self.serving: str | None = data.get("serving")
        self.pending: dict | None = data.get("pending")
        self.versions: dict[str, dict] = data.get("versions", {})
        self.state: dict = data.get("state", {})  # the loop's own bookkeeping (last feedback id used, ...)

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """Hold the lock, re-read the file, let the caller change the snapshot, then write it durably."""
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise PosttrainError(f"{self.root}: another process has held registry.lock for over {LOCK_TIMEOUT_S:.0f} s"
                                 " (a loop or rollback still running?)") from None
        try:
            self.reload()
            yield self
            self._save()
        finally:
            self._lock.release()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        data = {"serving": self.serving, "pending": self.pending, "versions": self.versions, "state": self.state}
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.root)

    def _log(self, event: str, **fields) -> dict:
        """Append an audit line (callers hold the lock)."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}
        with self.audit_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def log(self, event: str, **fields) -> dict:
        with self.transaction():
            return self._log(event, **fields)

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def update_state(self, **fields) -> None:
        with self.transaction():
            self.state.update(fields)

    # -- versions ---------------------------------------------------------------------------------------------
    def adapter_of(self, version: str) -> str | None:
        return self.get(version)["adapter"]

    def get(self, version: str) -> dict:
        if version not in self.versions:
            known = ", ".join(self.versions) or "none"
            raise PosttrainError(f"version '{version}' is not in the registry {self.root} (versions: {known})")
        return self.versions[version]

    def servable(self, version: str) -> tuple[bool, str]:
        """(may it serve?, why not): only versions that passed their gates, or an audited override."""
        v = self.get(version)
        if v["status"] == "rejected":
            return False, (f"version '{version}' was rejected by the gates ({'; '.join(v['reasons'])}); a rejected "
                           "candidate never serves")
        if v["status"] in GATED or v.get("override"):
            return True, ""
        return False, (f"version '{version}' is a {v['status']} that never passed its gates; only gated versions "
                       "serve (an operator can force it with `posttrain rollback VERSION --override --reason ...`)")

    def register(self, adapter: str | Path | None, *, parent: str | None, data: dict[str, str] | None = None,
                 metrics: dict | None = None, note: str = "") -> str:
        """Copy ``adapter`` (None = the base model alone) into the registry as a new version; returns its id."""
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise PosttrainError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        with self.transaction():
            vid = f"v{len(self.versions)}"
            stored = None
            if adapter is not None:
                target = self.root / "versions" / vid
                if target.exists():  # left by a crash before the registry recorded it
                    shutil.rmtree(target)
                shutil.copytree(adapter, target, ignore=shutil.ignore_patterns("checkpoint-*", "*.bin", "*.pt"))
                stored = str(target)
            self.versions[vid] = {"id": vid, "adapter": stored, "parent": parent, "created": time.time(),
                                  "status": "candidate", "gates_passed": False, "data": data or {},
                                  "metrics": metrics or {}, "note": note, "reasons": []}
            self._log("register", version=vid, parent=parent, adapter=stored, data=data or {}, note=note)
        return vid

    def decide(self, version: str, promote: bool, reasons: list[str], metrics: dict) -> None:
        """Record the gates' decision. A promotion becomes ``pending`` until :meth:`confirm`."""
        with self.transaction():
            v = self.get(version)
            if v["status"] != "candidate":
                raise PosttrainError(f"version '{version}' was already decided ({v['status']})")
            v["metrics"], v["reasons"] = metrics, reasons
            if promote:
                v["status"], v["gates_passed"] = "approved", True
                self.pending = {"version": version, "event": "promote", "since": time.time()}
                self._log("promote", version=version, parent=v["parent"], reasons=reasons, metrics=metrics)
            else:
                v["status"] = "rejected"
                self._log("reject", version=version, parent=v["parent"], reasons=reasons, metrics=metrics)

    def rollback(self, version: str, reason: str = "", *, override: bool = False, via: str = "cli") -> str:
        """Ask for ``version`` to serve (again): it must have passed its gates (or, for a never-gated candidate,
        ``override`` with a reason, audited). Pending until :meth:`confirm`. The audit event is ``rollback`` for a
        version that served before and ``promote`` for one that never has (an approved version whose switch was
        superseded, or an override); ``via`` records who asked (``cli`` or ``ui``). Returns the event."""
        with self.transaction():
            v = self.get(version)
            ok, why = self.servable(version)
            if not ok and override and v["status"] == "candidate":
                if not reason.strip():
                    raise PosttrainError("--override needs --reason: the audit log records why a version that never "
                                         "passed its gates was served")
                v["override"] = reason
                self._log("override", version=version, reason=reason)
            elif not ok:
                raise PosttrainError(why)
            event = "rollback" if v["status"] in ("serving", "retired") else "promote"
            self.pending = {"version": version, "event": event, "since": time.time()}
            self._log(event, version=version, previous=self.serving, reason=reason, via=via)
            return event

    def confirm(self, version: str, where: str) -> None:
        """The server serves ``version`` now (``where`` says how we know): it becomes ``serving``."""
        with self.transaction():
            v = self.get(version)
            ok, why = self.servable(version)
            if not ok:
                raise PosttrainError(why)
            if self.serving == version and self.pending is None:
                return
            if self.serving is not None and self.serving != version and self.serving in self.versions:
                self.versions[self.serving]["status"] = "retired"
            v["status"] = "serving"
            previous, self.serving = self.serving, version
            if self.pending is not None and self.pending["version"] == version:
                self.pending = None
            self._log("serving", version=version, previous=previous, where=where)

    def wanted(self) -> str | None:
        """The version that should serve: the pending one, else the serving one."""
        return self.pending["version"] if self.pending else self.serving
