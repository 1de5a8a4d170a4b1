"""Page names, and the links a report may draw: only to pages that exist, or that the same writer writes.

A report folder holds a journey page per stored prompt (its last token, ``journey-<id>.html``), one per generation
step (``journey-<id>-p<pos>.html``), a page per run and ``index.html``. A served store renders the same names on
request. `Links` answers "which page shows this?" with a name, or None when no page does, so a page never links to
a page that is not there (`geomap.report.linkcheck` checks the built pages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geomap.analysis.page_reads import PageKeys


def journey_name(prompt_id: int, pos: int | None = None) -> str:
    """``journey-<id>.html`` for a prompt's last token, ``journey-<id>-p<pos>.html`` for another position."""
    return f"journey-{prompt_id}.html" if pos is None else f"journey-{prompt_id}-p{pos}.html"


def run_name(run_id: int) -> str:
    """``run-<id>.html``."""
    return f"run-{run_id}.html"


@dataclass(frozen=True)
class Links:
    """Which page shows a prompt's token or a run, given the store's pages and what exists beside this page.

    Attributes:
        keys: The store's journey pages (`geomap.analysis.page_reads.page_keys`).
        available: Whether a page of this name is there (a folder: written or about to be; served: always).
    """

    keys: PageKeys
    available: Callable[[str], bool]

    def journey(self, prompt_id: int, pos: int | None = None) -> str | None:
        """The page of a prompt's token at ``pos``, or None when no page shows it.

        ``pos`` None: a stored prompt's last token, or a generation's last step.
        """
        prompt_id = int(prompt_id)
        last = self.keys.roots.get(prompt_id)
        if pos is None and last is None:
            pos = max((s for p, s in self.keys.steps if p == prompt_id), default=None)
            if pos is None:
                return None
        if last is not None and (pos is None or int(pos) == last):
            name = journey_name(prompt_id)
        elif (prompt_id, int(pos)) in self.keys.steps:
            name = journey_name(prompt_id, int(pos))
        else:
            return None
        return name if self.available(name) else None

    def run(self, run_id: int) -> str | None:
        """The run's page, or None."""
        name = run_name(int(run_id))
        return name if self.available(name) else None

    def planned(self) -> set[str]:
        """Every page a writer of all of the store's reports writes (journeys, steps, runs)."""
        names = {journey_name(p) for p in self.keys.roots}
        names |= {journey_name(p, s) for p, s in self.keys.steps}
        return names | {run_name(r) for r in self.keys.runs.values()}


def _always(name: str) -> bool:
    return True


@dataclass(frozen=True)
class _InFolder:
    """Whether a page is in ``folder`` or ``planned`` (a class, not a closure: build workers receive it pickled)."""

    folder: Path
    planned: frozenset[str]

    def __call__(self, name: str) -> bool:
        return name in self.planned or (self.folder / name).exists()


def served(keys: PageKeys) -> Links:
    """Links of a served store: every page of the store is rendered on request."""
    return Links(keys, _always)


def in_folder(keys: PageKeys, folder: Path, planned: frozenset[str] = frozenset()) -> Links:
    """Links of pages written to ``folder``: to the pages there, plus ``planned`` (written by the same call)."""
    return Links(keys, _InFolder(Path(folder), frozenset(planned)))
