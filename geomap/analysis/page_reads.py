"""Read which report pages a store has: the SQL the report stage's link resolution needs (it never writes)."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb


@dataclass(frozen=True)
class PageKeys:
    """The journey pages a store's reports hold, and the runs they belong to.

    Attributes:
        roots: Stored prompts that are not generations: prompt id → its last position (page ``journey-<id>.html``).
        steps: ``(prompt id, position)`` of every generation step (page ``journey-<id>-p<pos>.html``).
        runs: prompt id → its run, for every prompt above.
        parents: generation prompt id → the prompt it continues.
    """

    roots: dict[int, int]
    steps: frozenset[tuple[int, int]]
    runs: dict[int, int]
    parents: dict[int, int]

    def steps_of(self, prompt_ids) -> set[tuple[int, int]]:
        """The generation steps of these prompts' generations (and of these prompts, if generations)."""
        ids = set(prompt_ids)
        return {(p, s) for p, s in self.steps if p in ids or self.parents.get(p) in ids}


def page_keys(con: duckdb.DuckDBPyConnection) -> PageKeys:
    """Every journey page the store's reports write: each stored prompt's last token, each generation step."""
    roots = con.execute("SELECT id, n_tokens - 1, run_id FROM prompts WHERE status = 'done' "
                        "AND parent_id IS NULL").fetchall()
    steps = con.execute("""SELECT DISTINCT d.prompt_id, d.pos, p.run_id, p.parent_id FROM decisions d
                           JOIN prompts p ON p.id = d.prompt_id AND p.status = 'done'
                           WHERE d.source = 'generate'""").fetchall()
    runs = {int(p): int(r) for p, _, r in roots} | {int(p): int(r) for p, _, r, _ in steps}
    return PageKeys({int(p): int(last) for p, last, _ in roots}, frozenset((int(p), int(s)) for p, s, _, _ in steps),
                    runs, {int(p): int(q) for p, _, _, q in steps if q is not None})
