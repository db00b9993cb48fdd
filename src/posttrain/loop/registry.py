"""The version registry of ``posttrain loop``: every adapter that was ever a candidate, which one serves, and an
append-only audit log of every decision.

Layout under the registry root::

    registry.json          {"serving": "v2", "versions": {"v0": {...}, "v1": {...}}}
    versions/v1/           the candidate's adapter (a copy: later runs cannot change what a version is)
    audit.jsonl            one line per event: register, promote, reject, rollback, skip

A version records its parent (the version it was trained from), status (``serving``, ``promoted`` then
``retired`` when replaced, ``rejected``), the metrics the gates saw, the sha256 of its training data, and the
reasons of its decision. ``registry.json`` is replaced atomically (write + rename), so a crash leaves either
the old or the new file; audit lines are flushed and fsynced as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from posttrain.errors import PosttrainError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "registry.json"
        self.audit_path = self.root / "audit.jsonl"
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError as e:
                raise PosttrainError(f"{self.path}: not a registry file ({e})") from None
        else:
            data = {"serving": None, "versions": {}, "state": {}}
        self.serving: str | None = data.get("serving")
        self.versions: dict[str, dict] = data.get("versions", {})
        self.state: dict = data.get("state", {})  # the loop's own bookkeeping (last feedback id used, ...)

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"serving": self.serving, "versions": self.versions, "state": self.state}, indent=2))
        os.replace(tmp, self.path)

    def log(self, event: str, **fields) -> dict:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}
        with self.audit_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    # -- versions ---------------------------------------------------------------------------------------------
    def next_id(self) -> str:
        return f"v{len(self.versions)}"

    def adapter_of(self, version: str) -> str | None:
        return self.get(version)["adapter"]

    def get(self, version: str) -> dict:
        if version not in self.versions:
            known = ", ".join(self.versions) or "none"
            raise PosttrainError(f"version '{version}' is not in the registry {self.root} (versions: {known})")
        return self.versions[version]

    def register(self, adapter: str | Path | None, *, parent: str | None, data: dict[str, str] | None = None,
                 metrics: dict | None = None, note: str = "") -> str:
        """Copy ``adapter`` (None = the base model alone) into the registry as a new version; returns its id."""
        vid = self.next_id()
        stored = None
        if adapter is not None:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise PosttrainError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
            target = self.root / "versions" / vid
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(adapter, target, ignore=shutil.ignore_patterns("checkpoint-*", "*.bin", "*.pt"))
            stored = str(target)
        self.versions[vid] = {"id": vid, "adapter": stored, "parent": parent, "created": time.time(),
                              "status": "candidate", "data": data or {}, "metrics": metrics or {}, "note": note,
                              "reasons": []}
        self.save()
        self.log("register", version=vid, parent=parent, adapter=stored, data=data or {}, note=note)
        return vid

    def decide(self, version: str, promote: bool, reasons: list[str], metrics: dict) -> None:
        v = self.get(version)
        v["metrics"], v["reasons"] = metrics, reasons
        if promote:
            self._serve(version)
            self.log("promote", version=version, parent=v["parent"], reasons=reasons, metrics=metrics)
        else:
            v["status"] = "rejected"
            self.save()
            self.log("reject", version=version, parent=v["parent"], reasons=reasons, metrics=metrics)

    def rollback(self, version: str, reason: str = "") -> None:
        v = self.get(version)
        if v["status"] == "rejected":
            raise PosttrainError(f"version '{version}' was rejected by the gates ({'; '.join(v['reasons'])}); "
                                 "a rejected candidate never serves")
        previous = self.serving
        self._serve(version)
        self.log("rollback", version=version, previous=previous, reason=reason)

    def _serve(self, version: str) -> None:
        if self.serving is not None and self.serving in self.versions and self.serving != version:
            self.versions[self.serving]["status"] = "retired"
        self.versions[version]["status"] = "serving"
        self.serving = version
        self.save()
