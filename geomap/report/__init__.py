"""Report stage: self-contained HTML pages that tell a token's journey with the store's own numbers.

`journey_data` / `run_data` gather plain dicts from the store (running the analyses they need, which persist
their results); `render` turns them into HTML with autoescaped Jinja templates, safe JSON and no network loads.
"""
