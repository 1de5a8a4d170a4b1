"""Ingestion stage: prompt sources, TOML pipelines, runs, and the engine that drives capture into the store.

It sits between the stages (models, capture, store) and the faces (cli, serve): it is the only place that
both loads a model and writes to the store.
"""
