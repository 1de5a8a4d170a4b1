"""Per-journey facts the `journey` view reads: one row a prompt, written in the commit that stores the journey.

The `journey` view is every user's first query, and each request of a shared server pays for it. Computed at read
time it joined every prompt's tokens, top-k lists and lens statistics before a ``LIMIT`` could stop it, so its cost
grew with the store (16 ms at 300 prompts, 36 ms at 4,740). The facts are computed once, from the same rows and with
the same expressions, when a batch is merged (`fill`), and older stores are filled once when opened for writing.
The answer's text and the prompt's kind are facts too: joined at read time, the vocabulary (262k rows for Gemma)
and the runs cost a served `journey` query more than everything else it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

KIND = ("CASE WHEN p.parent_id IS NULL THEN 'prompt' WHEN r.pipeline = 'continue' THEN 'continuation' "
        "ELSE 'generation' END")  # the `prompt_kind` view's rule (the view comes later in the schema than this fill)

_FILL = """
INSERT INTO journey_facts
WITH last AS (
    SELECT id AS prompt_id, n_tokens - 1 AS pos FROM prompts
    WHERE status = 'done' AND id BETWEEN $first AND $last
      AND id NOT IN (SELECT prompt_id FROM journey_facts WHERE prompt_id BETWEEN $first AND $last)
),
depth AS (
    SELECT l.prompt_id, coalesce(max(l.layer) FILTER (WHERE l.final_rank > 1) + 1, 0) AS prediction_depth
    FROM lens_stats l JOIN last USING (prompt_id, pos) GROUP BY l.prompt_id
)
SELECT last.prompt_id, t.text, n.token_ids[1], n.probs[1], n.entropy, d.prediction_depth, v.text, """ + KIND + """
FROM last
JOIN tokens t ON t.prompt_id = last.prompt_id AND t.pos = last.pos
JOIN next_token n ON n.prompt_id = last.prompt_id AND n.pos = last.pos
JOIN prompts p ON p.id = last.prompt_id
LEFT JOIN runs r ON r.id = p.run_id
LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = n.token_ids[1]
LEFT JOIN depth d ON d.prompt_id = last.prompt_id
"""

_MIGRATE = """
UPDATE journey_facts SET top1_token = x.text, kind = x.kind
FROM (SELECT f.prompt_id, v.text, """ + KIND + """ AS kind
      FROM journey_facts f
      JOIN prompts p ON p.id = f.prompt_id
      LEFT JOIN runs r ON r.id = p.run_id
      LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = f.top1_id
      WHERE f.kind IS NULL) x
WHERE journey_facts.prompt_id = x.prompt_id
"""


def fill(con: duckdb.DuckDBPyConnection, first: int | None = None, last: int | None = None) -> None:
    """Store the facts of the done prompts with ids in ``[first, last]`` (all, by default) that have none yet.

    Idempotent; run it inside the transaction that stores those prompts' rows, so both commit together.
    """
    con.execute(_FILL, {"first": -(2**31) if first is None else int(first),
                        "last": 2**31 - 1 if last is None else int(last)})


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Give facts stored before ``top1_token`` and ``kind`` were facts those two columns (idempotent)."""
    con.execute("ALTER TABLE journey_facts ADD COLUMN IF NOT EXISTS top1_token VARCHAR")
    con.execute("ALTER TABLE journey_facts ADD COLUMN IF NOT EXISTS kind VARCHAR")
    con.execute(_MIGRATE)


def fill_for(con: duckdb.DuckDBPyConnection, prompt_ids: Sequence[int]) -> None:
    """`fill` over the id range of ``prompt_ids`` (a merged batch's new prompts); nothing when there are none."""
    if len(prompt_ids):
        fill(con, min(prompt_ids), max(prompt_ids))
