-- Interventions: counterfactual journeys stored as deltas against the clean journeys they change.
-- `{d}` is the store's residual width (as in schema.sql's vector tables).

CREATE TABLE IF NOT EXISTS interventions (      -- the ledger: one row per distinct spec (content-hashed)
    id INTEGER PRIMARY KEY,
    key VARCHAR UNIQUE,                         -- sha256(model identity, canonical spec JSON)
    run_id INTEGER,                             -- the sweep that stored it
    prompt_id INTEGER,                          -- the clean journey it changes (prompts.id)
    source_prompt_id INTEGER,                   -- the run it copies from (patch, resample, trace with a prompt)
    operation VARCHAR,                          -- 'patch', 'ablate', 'steer', 'trace'
    site VARCHAR,                               -- 'resid', 'attn', 'mlp', 'head'
    layer SMALLINT,                             -- residual boundary (resid) or decoder layer
    head SMALLINT,
    positions INTEGER[],                        -- in the clean prompt
    coefficient DOUBLE,                         -- steering α
    seed BIGINT,                                -- noise seed of a noisy trace
    sweep VARCHAR,                              -- a name grouping the interventions of one sweep
    first_layer SMALLINT,                       -- the first residual boundary the delta holds vectors for
    first_pos INTEGER,                          -- the first position the delta holds
    spec JSON                                   -- the whole spec (vectors as label + sha256)
);

-- @@ vector tables @@

CREATE TABLE IF NOT EXISTS intervention_states (  -- the delta: rows at positions >= first_pos
    intervention_id INTEGER,
    pos INTEGER,
    layer SMALLINT,
    norm FLOAT,
    cos_final FLOAT,                            -- to the intervened run's own final residual at this position
    vec FLOAT[{d}],                             -- NULL below first_layer (the vector is the clean one)
    top1_id INTEGER,                            -- lens top-1 (last position only)
    top1_prob FLOAT,
    PRIMARY KEY (intervention_id, pos, layer)
);

CREATE TABLE IF NOT EXISTS effects (            -- per intervention and target token, at the last position
    intervention_id INTEGER,
    token_id INTEGER,
    token VARCHAR,
    logit FLOAT,
    prob FLOAT,
    rank INTEGER,                               -- 1-based, in the intervened final distribution
    clean_logit FLOAT,
    clean_prob FLOAT,
    clean_rank INTEGER,
    logit_change FLOAT,                         -- intervened - clean
    prob_change FLOAT,
    kl FLOAT,                                   -- KL(clean || intervened) of the final distribution, nats
    top1_id INTEGER,                            -- the intervened run's top-1 token
    top1_changed BOOLEAN,                       -- the intervened top-1 differs from the clean top-1
    first_flip_layer SMALLINT,                  -- first boundary where the lens top-1 differs from clean's; NULL: none
    lens_ranks INTEGER[],                       -- the token's lens rank at the last position, per boundary 0..L
    clean_lens_ranks INTEGER[],                 -- the same in the clean run
    PRIMARY KEY (intervention_id, token_id)
);
-- stores made before the per-boundary ranks: the columns are added (NULL for the interventions already stored)
ALTER TABLE effects ADD COLUMN IF NOT EXISTS lens_ranks INTEGER[];
ALTER TABLE effects ADD COLUMN IF NOT EXISTS clean_lens_ranks INTEGER[];

-- An intervened journey as a whole: the clean states where the delta holds nothing, the delta elsewhere.
CREATE OR REPLACE VIEW counterfactual_states AS
SELECT i.id AS intervention_id, i.prompt_id, s.pos, s.layer,
       coalesce(d.norm, s.norm) AS norm,
       coalesce(d.cos_final, s.cos_final) AS cos_final,
       CASE WHEN d.vec IS NOT NULL THEN d.vec ELSE s.vec END AS vec,
       CASE WHEN d.vec IS NOT NULL THEN NULL ELSE s.vec_bf16 END AS vec_bf16,
       d.vec IS NOT NULL AS changed
FROM interventions i
JOIN states s ON s.prompt_id = i.prompt_id
LEFT JOIN intervention_states d ON d.intervention_id = i.id AND d.pos = s.pos AND d.layer = s.layer;

-- `trajectory`'s columns for an intervened journey (lens columns where they are known for it).
CREATE OR REPLACE VIEW counterfactual_trajectory AS
SELECT c.intervention_id, c.prompt_id, c.pos, c.layer, c.norm, c.cos_final, c.changed,
       CASE WHEN d.top1_id IS NOT NULL THEN d.top1_id WHEN d.intervention_id IS NULL THEN l.top1_id END AS top1_id,
       CASE WHEN d.top1_id IS NOT NULL THEN d.top1_prob WHEN d.intervention_id IS NULL THEN l.top1_prob END
           AS top1_prob,
       l.top1_id AS clean_top1_id
FROM counterfactual_states c
LEFT JOIN intervention_states d ON d.intervention_id = c.intervention_id AND d.pos = c.pos AND d.layer = c.layer
LEFT JOIN lens_stats l ON l.prompt_id = c.prompt_id AND l.pos = c.pos AND l.layer = c.layer;
