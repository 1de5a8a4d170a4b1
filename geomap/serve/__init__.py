"""``geomap serve``: the store over HTTP (FastAPI + uvicorn), its perimeter, jobs, and the CLI's client."""
