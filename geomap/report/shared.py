"""What the journey pages of one build read once instead of once per page.

A build of many pages (`geomap.report.api.pipeline_reports`, a pipeline's reports) holds its store open while it
reads, so what every page repeats can be read once: the run's facts, its PCA map and the map's points, token texts
(the whole vocabulary, read in one query), a prompt's generation steps and its neighbours in the run. A page
rendered alone gets a fresh `PageReads` (``build=False``): it memoises within the page only and looks token texts up
by id, which is cheaper than reading the vocabulary for one page. Either way the rows are the store's: a page comes
out the same.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from geomap.analysis import journey_reads as reads
from geomap.analysis import load


@dataclass
class PageReads:
    """The reads a page shares with the other pages of its build (``build``), memoised while the build lasts.

    Attributes:
        build: Read the whole vocabulary on the first token text (a build of many pages), rather than by id.
    """

    build: bool = False
    _memo: dict = field(default_factory=dict, repr=False)

    def _get(self, key: tuple, read):
        if key not in self._memo:
            self._memo[key] = read()
        return self._memo[key]

    def run_facts(self, con, run_id: int) -> reads.RunFacts:
        """`journey_reads.run_facts`."""
        return self._get(("run", run_id), lambda: reads.run_facts(con, run_id))

    def pca_projection(self, con, run_id: int):
        """`journey_reads.pca_projection`."""
        return self._get(("pca", run_id), lambda: reads.pca_projection(con, run_id))

    def map_points(self, con, projection_id: int):
        """`journey_reads.map_points` (the same lists for every page of the run: read them, never change them)."""
        return self._get(("points", projection_id), lambda: reads.map_points(con, projection_id))

    def generations(self, con, prompt_id: int) -> list[dict]:
        """`journey_reads.generations`, copied (a page fills in its rows' links)."""
        return copy.deepcopy(self._get(("generations", prompt_id), lambda: reads.generations(con, prompt_id)))

    def neighbour_prompts(self, con, run_id: int, prompt_id: int) -> dict:
        """`journey_reads.neighbour_prompts`, copied."""
        return copy.deepcopy(self._get(("around", prompt_id),
                                       lambda: reads.neighbour_prompts(con, run_id, prompt_id)))

    def token_texts(self, con, weights_sha256: str, ids) -> dict[int, str]:
        """`load.token_texts`: from the whole vocabulary, read once, in a build; else by id."""
        if not self.build:
            return load.token_texts(con, weights_sha256, ids)
        vocab = self._get(("vocab", weights_sha256), lambda: dict(con.execute(
            "SELECT token_id, text FROM vocab WHERE weights_sha256 = ?", [weights_sha256]).fetchall()))
        return {int(i): vocab[int(i)] for i in ids if int(i) in vocab}
