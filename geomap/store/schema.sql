-- geomap store schema. DuckDB is the source of truth; FAISS indexes are derived from `states`.
-- Part 1 is static. Part 2 (after the marker line) holds the vector tables; `{d}` is the residual width of the
-- store's model, fixed by the first run (a store holds one width; FLOAT[{d}] is DuckDB's fixed-size array).

CREATE TABLE IF NOT EXISTS store_meta (
    key VARCHAR PRIMARY KEY,                -- 'schema_version', 'd_model', 'model', 'weights_sha256'
    value VARCHAR
);

CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    model VARCHAR,                          -- preset name, directory or hub id
    model_type VARCHAR,                     -- config.model_type
    weights_sha256 VARCHAR,                 -- sha256 of the safetensors weights
    dtype VARCHAR,                          -- compute dtype
    vector_dtype VARCHAR,                   -- 'float32' or 'bfloat16' (storage of state vectors)
    capture_config JSON,                    -- canonical JSON of CaptureConfig
    pipeline VARCHAR,                       -- pipeline name, or 'ingest'
    status VARCHAR,                         -- 'running', 'done', 'failed'
    n_layers INTEGER, d_model INTEGER, n_heads INTEGER, n_kv_heads INTEGER, head_dim INTEGER, vocab_size INTEGER
);

CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    key VARCHAR UNIQUE,                     -- sha256(model id + weights hash, capture config JSON, text[, decoding])
    run_id INTEGER,
    text VARCHAR,
    source VARCHAR,                         -- file the prompt came from, or 'inline'
    source_id VARCHAR,                      -- id given by the source (jsonl/csv/parquet `id`), if any
    tags VARCHAR[],
    n_tokens INTEGER,
    status VARCHAR,                         -- 'done' or 'error'
    error VARCHAR,                          -- why it failed (status 'error')
    truncated BOOLEAN,
    parent_id INTEGER,                      -- generations: the prompt they continue
    decoding JSON                           -- generations: decoding settings and seed
);

CREATE TABLE IF NOT EXISTS vocab (          -- one row per token of each model's vocabulary
    weights_sha256 VARCHAR,
    token_id INTEGER,
    text VARCHAR,                           -- display text (U+FFFD inside unfinished UTF-8)
    raw BLOB,
    special BOOLEAN,
    PRIMARY KEY (weights_sha256, token_id)
);

CREATE TABLE IF NOT EXISTS tokens (
    prompt_id INTEGER,
    pos INTEGER,
    token_id INTEGER,
    text VARCHAR,
    raw BLOB,
    special BOOLEAN,
    generated BOOLEAN,                      -- produced by `geomap generate` rather than the prompt
    PRIMARY KEY (prompt_id, pos)
);

CREATE TABLE IF NOT EXISTS norm_names (     -- what `norms.norm` means for each architecture
    model_type VARCHAR,
    norm SMALLINT,                          -- 0..K-1 in-layer norms in execution order; K = the final norm
    name VARCHAR,
    PRIMARY KEY (model_type, norm)
);

CREATE TABLE IF NOT EXISTS norms (
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,                         -- decoder layer; the final norm is stored at layer L
    norm SMALLINT,
    scale FLOAT                             -- the scalar the norm multiplied its input by (1/rms or 1/std)
);

CREATE TABLE IF NOT EXISTS mlp_features (
    prompt_id INTEGER,
    pos INTEGER,                            -- a captured query position
    layer SMALLINT,
    neurons INTEGER[],                      -- most active hidden neurons, largest |activation| first
    activations FLOAT[]
);

CREATE TABLE IF NOT EXISTS lens (
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,                         -- residual boundary 0..L
    token_ids INTEGER[],                    -- top-k under the lens, best first
    logits FLOAT[],
    probs FLOAT[]
);

CREATE TABLE IF NOT EXISTS lens_stats (
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,
    top1_id INTEGER,
    top1_prob FLOAT,
    entropy FLOAT,                          -- nats
    logsumexp FLOAT,
    kl_to_final FLOAT,                      -- KL(lens || final), nats
    final_rank INTEGER,                     -- 1-based rank of the final top-1 token under the lens
    final_prob FLOAT,
    top1_token VARCHAR,                     -- display text of top1_id, copied from vocab (reading it scans no vocab)
    PRIMARY KEY (prompt_id, pos, layer)
);

CREATE TABLE IF NOT EXISTS next_token (
    prompt_id INTEGER,
    pos INTEGER,
    token_ids INTEGER[],                    -- the model's final top-k at this position, best first
    logits FLOAT[],
    probs FLOAT[],
    entropy FLOAT,
    logsumexp FLOAT,
    PRIMARY KEY (prompt_id, pos)
);

-- One row per stored journey: what its last position answers, written in the same commit as the journey, so the
-- `journey` view reads one row a prompt instead of joining every token, top-k list and lens statistic in the store.
CREATE TABLE IF NOT EXISTS journey_facts (
    prompt_id INTEGER PRIMARY KEY,
    last_token VARCHAR,                     -- the text of the prompt's last token
    top1_id INTEGER,                        -- the model's top-1 next token there
    top1_prob FLOAT,
    entropy FLOAT,                          -- of the final next-token distribution, nats
    prediction_depth SMALLINT,              -- first residual boundary from which the lens top-1 stays the answer
    top1_token VARCHAR,                     -- the text of top1_id (the run's vocabulary)
    kind VARCHAR                            -- prompt, continuation or generation, as `prompt_kind` says
);

CREATE TABLE IF NOT EXISTS final_logits (  -- the last position's full-vocabulary logits, 4096 token ids a row
    prompt_id INTEGER,
    chunk SMALLINT,                         -- token ids chunk*4096 .. chunk*4096 + 4095
    logits FLOAT[4096]                      -- NaN past the end of the vocabulary
);

CREATE TABLE IF NOT EXISTS step_logits (  -- a generation step's full-vocabulary logits, as final_logits' rows
    prompt_id INTEGER,
    pos INTEGER,                            -- the position whose next token the step decided
    chunk SMALLINT,                         -- token ids chunk*4096 .. chunk*4096 + 4095
    logits FLOAT[4096]                      -- NaN past the end of the vocabulary
);

CREATE TABLE IF NOT EXISTS merged_shards (  -- shards merged into the store (a shard is merged once)
    shard_id VARCHAR PRIMARY KEY,           -- content id: sha256 of the shard's prompt keys and meta
    merged_at TIMESTAMP,
    run_id INTEGER,
    prompts INTEGER                         -- new prompts it added (its others were stored already)
);

CREATE TABLE IF NOT EXISTS faiss_manifest (
    layer SMALLINT,                         -- residual boundary; -1 for vocabulary indexes
    kind VARCHAR,                           -- 'states:flat', 'states:ivf', 'states:hnsw'
    path VARCHAR,                           -- relative to the store's index folder
    dim INTEGER,
    metric VARCHAR,                         -- 'inner_product' on standardised, L2-normalised states
    ntotal BIGINT,
    max_id BIGINT,
    sha256 VARCHAR,
    mean FLOAT[],                           -- per-layer standardisation frozen at build
    std FLOAT[],
    built_at TIMESTAMP,
    PRIMARY KEY (layer, kind)
);

-- @@ vector tables @@

CREATE TABLE IF NOT EXISTS states (
    id BIGINT PRIMARY KEY,                  -- also the FAISS id
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,                         -- residual boundary 0..L (0 = embedding output)
    norm FLOAT,                             -- L2 norm of the residual
    cos_final FLOAT,                        -- cosine to the same position's final-layer residual
    vec FLOAT[{d}],                         -- the residual (vector_dtype 'float32'), else NULL
    vec_bf16 BLOB                           -- vector_dtype 'bfloat16': d little-endian uint16, the top half of each float32
);

CREATE TABLE IF NOT EXISTS contributions (
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,                         -- decoder layer: resid[layer] + attn + mlp = resid[layer + 1]
    attn FLOAT[{d}],
    mlp FLOAT[{d}],
    attn_norm FLOAT,
    mlp_norm FLOAT,
    attn_bias FLOAT[{d}]                    -- W_O bias share at captured query positions (else NULL)
);

CREATE TABLE IF NOT EXISTS attention (
    prompt_id INTEGER,
    layer SMALLINT,
    head SMALLINT,
    pos INTEGER,                            -- query position
    scores FLOAT[],                         -- q·k × scaling over key positions 0..T-1, before the mask
    weights FLOAT[],                        -- softmax(scores + mask), sums to 1
    entropy FLOAT,                          -- of `weights`, nats
    q FLOAT[],                              -- post-RoPE query of this head
    k FLOAT[],                              -- post-RoPE key of this head's KV group at the query position
    v FLOAT[],                              -- value of this head's KV group at the query position
    head_out FLOAT[],                       -- the head's weighted sum of values
    share FLOAT[{d}],                       -- the head's part of the attention update (through W_O)
    share_norm FLOAT
);

-- Views: the common questions as one short query.

-- What each stored prompt is: a user's prompt, a pipeline's continuation of one (`continuation_tokens`), or a
-- `geomap generate` generation; the two last name the prompt they continue (parent_id).
CREATE OR REPLACE VIEW prompt_kind AS
SELECT p.id AS prompt_id, p.parent_id, p.source_id,
       CASE WHEN p.parent_id IS NULL THEN 'prompt' WHEN r.pipeline = 'continue' THEN 'continuation'
            ELSE 'generation' END AS kind
FROM prompts p
LEFT JOIN runs r ON r.id = p.run_id;

-- `internal.state_scalars` is the key and scalars of every state (geomap/store/scalars.py): a view over `states` in
-- the rows layout, a table in the segments layout, so a trajectory never opens a vector segment.
CREATE OR REPLACE VIEW trajectory AS
SELECT s.prompt_id, s.pos, s.layer, s.norm, s.cos_final,
       l.top1_id, l.top1_token, l.top1_prob, l.entropy, l.kl_to_final, l.final_rank, l.final_prob,
       k.kind, k.parent_id
FROM internal.state_scalars s
LEFT JOIN lens_stats l USING (prompt_id, pos, layer)
LEFT JOIN prompt_kind k USING (prompt_id);

CREATE OR REPLACE VIEW journey AS
SELECT p.id AS prompt_id, p.run_id, p.text, p.tags, p.n_tokens,
       f.last_token, f.top1_id, f.top1_token, f.top1_prob, f.entropy, f.prediction_depth,
       f.kind, p.parent_id, p.source_id
FROM prompts p
JOIN journey_facts f ON f.prompt_id = p.id
WHERE p.status = 'done';
