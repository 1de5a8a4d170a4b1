"""Report stage: self-contained HTML pages that tell a token's journey with the store's own numbers.

`journey_data` / `run_data` read the store and the weight slice beside it (no model, no write); `render` turns
what they gather into HTML with autoescaped Jinja templates, safe JSON and no network loads. What a page needs that
is not stored yet (a run's PCA map, an older store's weight slice) is a precondition (`api.prepare`).
"""
