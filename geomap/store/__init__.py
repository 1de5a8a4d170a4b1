"""Store stage: DuckDB tables (source of truth) and derived FAISS indexes."""
