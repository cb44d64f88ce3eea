"""A site's own record of what it has released, checked before anything leaves it.

The server decides a round's sampling, its instructions and, through the run config, even
``federation.rounds``; a site that trusts none of that keeps a ledger of its releases, one entry
per upload: what it was (a local-DP noised update, or a masked input of secure aggregation), the
run name, the round, the partition, and for local DP the σ, the planned rounds and δ it was noised
for. Before each upload the site asks its ledger, which refuses:

- **a second release for one (run, round, partition)**: two masked inputs of one round, summed with
  different survivors, differ by one client's update; two noised uploads of one round double the
  privacy spent;
- **a local-DP run whose σ or rounds changed after its first upload** (a server that lowers
  ``federation.rounds`` makes a site calibrate a smaller σ for ``target_epsilon``);
- **a local-DP upload over the site's budget**: the ε at δ of every local-DP upload of that partition
  in the ledger, over all runs, composed by dp-accounting's RDP accountant (one
  ``GaussianDpEvent(σ/2)`` per upload, as :class:`~fedprompt.federation.privacy.accounting.PrivacyPlan`
  accounts local DP), must stay within ``privacy.site_epsilon_budget`` (default
  ``privacy.target_epsilon``), so a server cannot start new runs without limit.

An entry is written (durably, for a file ledger) before the upload leaves, so an upload whose
sending then fails is counted all the same: the ledger errs on the side of the site.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fedprompt.files import write_text_atomically

log = logging.getLogger("fedprompt.privacy")

LEDGER_FILE = "site-ledger.json"
"""The ledger's file name inside a site's state folder."""


class LedgerRefusal(RuntimeError):
    """An upload the site's ledger refuses; the message says why and what would allow it."""


@dataclass(frozen=True)
class Release:
    """One upload of a site: its kind, run name, round and partition; for local DP, the noise
    multiplier σ, the rounds it was planned for and δ."""

    kind: Literal["local-dp", "masked"]
    run: str
    round: int
    client_id: int
    sigma: float | None = None
    rounds: int | None = None
    delta: float | None = None


_WHAT = {"local-dp": "noised update", "masked": "masked input"}


class SiteLedger(ABC):
    """Owns one site's list of releases and the rules above; subclasses keep the list somewhere
    (``persistent``: whether it outlives the process and the Flower run)."""

    persistent: bool = False

    @abstractmethod
    def _load(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _save(self, entries: list[dict[str, Any]]) -> None: ...

    def releases(self) -> list[Release]:
        return [Release(**entry) for entry in self._load()]

    def record(self, release: Release, budget: float | None = None) -> float | None:
        """Check ``release`` against the ledger and write it down; the ε at δ this partition has spent
        on local DP with it (None for a masked input). ``budget`` caps that ε (local DP)."""
        known = self.releases()
        if any(
            (r.kind, r.run, r.round, r.client_id)
            == (release.kind, release.run, release.round, release.client_id)
            for r in known
        ):
            raise LedgerRefusal(
                f"this site already sent its {_WHAT[release.kind]} for round {release.round} of run "
                f"{release.run!r} (partition {release.client_id}); a second one would let the server "
                "compare the two. Nothing is sent"
            )
        spent = None
        if release.kind == "local-dp":
            spent = self._check_local(release, known, budget)
        self._save([*(asdict(r) for r in known), asdict(release)])
        return spent

    def _check_local(self, release: Release, known: list[Release], budget: float | None) -> float:
        assert release.sigma is not None and release.delta is not None and release.rounds is not None
        same_run = [
            r
            for r in known
            if r.kind == "local-dp" and r.run == release.run and r.client_id == release.client_id
        ]
        if same_run and (same_run[0].sigma, same_run[0].rounds) != (release.sigma, release.rounds):
            first = same_run[0]
            raise LedgerRefusal(
                f"run {release.run!r} started with noise_multiplier {first.sigma!r} over {first.rounds} "
                f"rounds on this site; now it asks for {release.sigma!r} over {release.rounds}. A site's "
                "noise is fixed at its first upload: refused (start a new run to change it)"
            )
        if release.round > release.rounds:
            raise LedgerRefusal(
                f"round {release.round} of run {release.run!r}, which this site's noise was planned for "
                f"{release.rounds} rounds: refused"
            )
        sigmas = [r.sigma for r in known if r.kind == "local-dp" and r.client_id == release.client_id]
        spent = local_epsilon([*sigmas, release.sigma], release.delta)
        if budget is not None and spent > budget * (1 + 1e-9):
            before = local_epsilon(sigmas, release.delta) if sigmas else 0.0
            raise LedgerRefusal(
                f"this upload would bring the ε this site spent on partition {release.client_id} to "
                f"{spent:.4g} at δ={release.delta:g} over {len(sigmas) + 1} uploads in all runs (now "
                f"{before:.4g}), over its budget of {budget:g} (privacy.site_epsilon_budget, or "
                "target_epsilon). Nothing is sent"
            )
        return spent


def local_epsilon(sigmas: list[float], delta: float) -> float:
    """ε at ``delta`` of uploads noised with these noise multipliers (local DP: each one a Gaussian
    mechanism of σ/2 on replace-one neighbours), composed by dp-accounting's RDP accountant."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from fedprompt.federation.privacy.accounting import RDP_ORDERS

    if not sigmas:
        return 0.0
    accountant = RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE)
    for sigma, count in sorted(Counter(sigmas).items()):
        accountant.compose(dp_accounting.GaussianDpEvent(sigma / 2), count)
    return float(accountant.get_epsilon(delta))


class MemoryLedger(SiteLedger):
    """A ledger that lives as long as its process (a site worker without a state folder)."""

    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []

    def _load(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def _save(self, entries: list[dict[str, Any]]) -> None:
        self._entries = list(entries)


class FileLedger(SiteLedger):
    """A ledger in a JSON file of the site's state folder, rewritten atomically and durably."""

    persistent = True

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LEDGER_FILE
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"the site's state folder {self.path.parent} does not exist; create it first"
            )

    def _load(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        try:
            entries = json.loads(self.path.read_text())["releases"]
            [Release(**entry) for entry in entries]
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerRefusal(
                f"{self.path} is not a site ledger ({exc}); this site sends nothing until it is restored"
            ) from None
        return entries

    def _save(self, entries: list[dict[str, Any]]) -> None:
        write_text_atomically(self.path, json.dumps({"releases": entries}, indent=1) + "\n")
