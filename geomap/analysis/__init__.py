"""Analysis stage: decoding, generation, unembedding geometry, attribution, projections, position, statistics.

Functions here take plain data (numpy arrays, frozen dataclasses read from the store by `geomap.store.read`)
and return plain data; persisting results is the store's job (`geomap.store.results`).
"""
