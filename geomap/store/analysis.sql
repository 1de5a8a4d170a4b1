-- geomap analysis results (geomap.analysis), written by the analysis commands, and statistics views.
-- Executed after schema.sql's vector tables exist; every statement is idempotent.

CREATE TABLE IF NOT EXISTS decisions (
    id BIGINT PRIMARY KEY,
    prompt_id INTEGER,                      -- for generations, the generation's own prompt row
    pos INTEGER,                            -- the position whose next-token distribution was decided
    step INTEGER,                           -- generation step (0-based); NULL for `geomap decode`
    source VARCHAR,                         -- 'decode' (stored logits) or 'generate' (live logits)
    strategy VARCHAR,                       -- 'greedy' or 'sample+temperature+top_k+top_p+min_p' (those set)
    temperature FLOAT, top_k INTEGER, top_p FLOAT, min_p FLOAT, seed BIGINT,
    exact BOOLEAN,                          -- FALSE when the unstored tail could change the decision
    tail_mass DOUBLE,                       -- probability (T = 1) of the tokens beyond the stored top-k
    cut_mass DOUBLE,                        -- mass of the kept set before the cuts (NULL when unknowable)
    kept_ids INTEGER[],                     -- kept candidates, most probable first
    kept_probs FLOAT[],                     -- their renormalised probabilities
    chosen_id INTEGER,
    chosen_rank INTEGER,                    -- 1-based rank by raw logit
    chosen_prob FLOAT,                      -- in the kept set
    model_prob FLOAT,                       -- under the model's own distribution (T = 1, no cut)
    created_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS geometry (       -- a state's alignment with unembedding (and embedding) vectors
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,
    role VARCHAR,                           -- 'candidate', 'contrast', 'nearest' (FAISS) or 'embedding' (layer 0)
    rank SMALLINT,                          -- order within the role
    token_id INTEGER,
    dot FLOAT,                              -- u · h̃ (the logit without bias); for 'embedding', e · h
    cosine FLOAT                            -- cos(u, h̃); for 'embedding', cos(e, h)
);

CREATE TABLE IF NOT EXISTS margins (        -- top-1 vs top-2 at a state, as geometry
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,
    top1_id INTEGER,
    top2_id INTEGER,
    margin FLOAT,                           -- logit1 − logit2
    direction_dot FLOAT,                    -- (u1 − u2) · h̃
    bias_diff FLOAT,                        -- b1 − b2 (0 without an unembedding bias)
    normed_norm FLOAT,                      -- |h̃|, the state as the unembedding sees it
    PRIMARY KEY (prompt_id, pos, layer)
);

CREATE TABLE IF NOT EXISTS attributions (   -- direct logit attribution of one token's logit at one position
    prompt_id INTEGER,
    pos INTEGER,
    token_id INTEGER,
    level VARCHAR,                          -- 'layer': embed, attn, mlp, bias rows (they sum to the logit);
                                            -- 'head': attn split into heads + attn_bias (they sum to attn)
    component VARCHAR,                      -- 'embed', 'attn', 'mlp', 'bias', 'head', 'attn_bias'
    layer SMALLINT,                         -- decoder layer; NULL for embed and bias
    head SMALLINT,                          -- NULL unless component = 'head'
    value FLOAT
);

CREATE TABLE IF NOT EXISTS projections (
    id INTEGER PRIMARY KEY,
    run_id INTEGER,
    method VARCHAR,                         -- 'pca', 'umap' or 'tsne'
    space VARCHAR,                          -- 'normed' (final norm applied) or 'standardised'
    layers SMALLINT[],                      -- layers fitted
    joint BOOLEAN,                          -- one basis across layers (else one fit per layer)
    layer SMALLINT,                         -- the layer of a per-layer fit; NULL when joint
    params JSON,                            -- the fit's settings (seed, neighbours, subsample, ...)
    n_points INTEGER,
    center FLOAT[],                         -- PCA: mean removed before projecting
    components FLOAT[][],                   -- PCA: the 2 × d basis
    explained FLOAT[],                      -- PCA: explained variance ratio per axis
    token_scale FLOAT,                      -- length given to unembedding directions before projecting
    created_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS projection_points (
    projection_id INTEGER,
    state_id BIGINT,                        -- states.id
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,
    x FLOAT,
    y FLOAT
);

CREATE TABLE IF NOT EXISTS projection_tokens (  -- unembedding directions of final top candidates, same space
    projection_id INTEGER,
    token_id INTEGER,
    x FLOAT,
    y FLOAT
);

CREATE TABLE IF NOT EXISTS rope_angles (    -- the rotation RoPE applies at each position of a prompt
    prompt_id INTEGER,
    rope VARCHAR,                           -- which rotation (Gemma-3: 'sliding_attention' / 'full_attention')
    pos INTEGER,
    pair SMALLINT,                          -- frequency pair i (dimensions i and i + head_dim/2)
    angle DOUBLE                            -- pos × inv_freq[i], radians
);

CREATE TABLE IF NOT EXISTS position_scores (  -- q·k of the last query vs one key, moved to other distances
    prompt_id INTEGER,
    layer SMALLINT,
    head SMALLINT,
    key_pos INTEGER,                        -- the key's real position
    distance INTEGER,                       -- query position − the key's (virtual) position
    score FLOAT                             -- scaled q·k with both rotated to those positions
);

CREATE TABLE IF NOT EXISTS position_vectors (  -- learned absolute position vectors (e.g. GPT-2's wpe)
    weights_sha256 VARCHAR,
    pos INTEGER,
    norm FLOAT
);

CREATE TABLE IF NOT EXISTS position_similarity (
    weights_sha256 VARCHAR,
    distance INTEGER,                       -- how far apart two positions are
    mean_cosine FLOAT                       -- mean cosine between learned position vectors that far apart
);

CREATE TABLE IF NOT EXISTS tuned_lens (     -- per-layer affine translators (Belrose et al. 2023)
    id INTEGER,
    layer SMALLINT,
    weights_sha256 VARCHAR,
    d INTEGER,
    weight BLOB,                            -- d × d float32, row-major, little-endian: h' = h + h @ W + b
    bias BLOB,                              -- d float32
    train_prompts INTEGER,
    heldout_kl FLOAT,                       -- mean KL to final on held-out prompts, nats
    logit_lens_kl FLOAT,                    -- the logit lens's on the same held-out prompts
    created_at TIMESTAMP,
    PRIMARY KEY (id, layer)
);

CREATE TABLE IF NOT EXISTS tuned_lens_stats (
    lens_id INTEGER,
    prompt_id INTEGER,
    pos INTEGER,
    layer SMALLINT,
    top1_id INTEGER,
    kl_to_final FLOAT,
    heldout BOOLEAN
);

-- Trajectory statistics.

CREATE OR REPLACE VIEW position_stats AS    -- per prompt and position
WITH finals AS (SELECT prompt_id, pos, token_ids[1] AS final_id FROM next_token),
depth AS (
    SELECT l.prompt_id, l.pos,
           coalesce(max(l.layer) FILTER (WHERE l.top1_id <> f.final_id) + 1, min(l.layer)) AS prediction_depth,
           max(l.layer) AS last_layer
    FROM lens_stats l JOIN finals f USING (prompt_id, pos) GROUP BY l.prompt_id, l.pos
)
SELECT s.prompt_id, s.pos, d.prediction_depth,
       max(s.norm) FILTER (WHERE s.layer = 0) AS norm_first,
       max(s.norm) FILTER (WHERE s.layer = (SELECT max(layer) FROM internal.state_scalars)) AS norm_last,
       list(s.norm ORDER BY s.layer) AS norms,
       list(s.cos_final ORDER BY s.layer) AS cos_final
FROM internal.state_scalars s LEFT JOIN depth d USING (prompt_id, pos)
GROUP BY s.prompt_id, s.pos, d.prediction_depth;

CREATE OR REPLACE VIEW layer_curves AS      -- per prompt, position and layer: the curves of a trajectory
SELECT s.prompt_id, s.pos, s.layer, s.norm, s.cos_final,
       s.norm / nullif(lag(s.norm) OVER (PARTITION BY s.prompt_id, s.pos ORDER BY s.layer), 0) AS norm_growth,
       l.entropy, l.kl_to_final, l.top1_id, l.final_rank,
       z.logits[1] - z.logits[2] AS lens_margin
FROM internal.state_scalars s    -- the key and scalars of every state (see `trajectory` in schema.sql)
LEFT JOIN lens_stats l USING (prompt_id, pos, layer)
LEFT JOIN lens z USING (prompt_id, pos, layer);

CREATE OR REPLACE VIEW head_stats AS        -- per prompt, layer and head, over its captured query positions
SELECT prompt_id, layer, head, count(*) AS queries,
       avg(entropy) AS entropy,
       avg(weights[pos]) FILTER (WHERE pos >= 1) AS to_previous,
       avg(weights[1]) AS to_first,
       avg(weights[pos + 1]) AS to_self
FROM attention
GROUP BY prompt_id, layer, head;
