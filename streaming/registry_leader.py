"""Trainer leadership in the model registry: the leader epoch and the fencing check (docs/LEADER.md).

Why a module of its own: fencing is the one rule that makes a stale trainer harmless (a write given
``fence=`` an epoch older than the claimed one is refused with :class:`FencedError`), and it is
easier to audit in one small place than spread through the registry's writers. The check runs
inside the registry's locked read-modify-write of ``state.json`` (each writer calls
:meth:`RegistryLeaderMixin._check_fence` with the state it is about to replace), so it is atomic
with the version allocation both locally and on object storage.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streaming.exceptions import FencedError


class RegistryLeaderMixin:
    """``claim_leadership`` and ``_check_fence`` for :class:`streaming.model_registry.ModelRegistry`."""

    if TYPE_CHECKING:
        def _state_path(self, name: str) -> Path: ...
        def state(self, name: str) -> dict[str, Any]: ...
        def latest(self, name: str) -> int | None: ...
        def _locked(self, name: str) -> contextlib.AbstractContextManager[None]: ...
        def _write_state(self, name: str, state: dict[str, Any]) -> None: ...
        def _append(self, state: dict[str, Any], action: str, version: int, reason: str,
                    **extra: Any) -> None: ...

    def _check_fence(self, name: str, state: dict[str, Any], fence: int | None) -> None:
        """Refuse a write of a leader whose epoch is not the newest claimed one (``fence=None``: unfenced)."""
        if fence is None:
            return
        claimed = int(state.get("leader_epoch") or 0)
        if int(fence) != claimed:
            raise FencedError(
                f"fence: trainer epoch {fence} is not the leader epoch {claimed} of model {name!r} in "
                f"{self._state_path(name)}; another trainer took over the lease, so this one must not "
                "publish or decide versions: it stops and rejoins as a standby (docs/LEADER.md)"
            )

    def claim_leadership(self, name: str, epoch: int) -> int:
        """Record ``epoch`` as the model's leader epoch; returns the previous one.

        Called by a trainer right after it acquired the lease and before it reads the registry to
        plan, so every write of an older leader after this point is refused (the fencing token is
        checked where the versions are allocated). An epoch older than the claimed one raises.
        """
        with self._locked(name):
            state = self.state(name)
            previous = int(state.get("leader_epoch") or 0)
            if int(epoch) < previous:
                raise FencedError(
                    f"epoch: {epoch} is older than the leader epoch {previous} of model {name!r}; "
                    "a newer trainer holds the lease; wait for it to expire"
                )
            if int(epoch) != previous:
                state["leader_epoch"] = int(epoch)
                self._append(state, "LEADER", self.latest(name) or 0, f"leader epoch {epoch}", epoch=int(epoch))
                self._write_state(name, state)
        return previous
