-- One metric back to the bytes it came from: the metric, the generations (or reference
-- answers) it was computed from, the models and checkpoints that wrote them, the datasets the
-- checkpoints were trained on and the question sets that were asked, down to the source files
-- and their BLAKE3. Set the metric id (or a prefix) first:
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c "SET VARIABLE metric = 'e480ed4a'" \
--          -c ".read queries/lineage.sql"
WITH RECURSIVE
m AS (
    SELECT * FROM read_parquet(getvariable('parquet') || '/metric/*/*.parquet')
    WHERE starts_with(id, getvariable('metric'))
),
gens AS (
    SELECT g.* FROM read_parquet(getvariable('parquet') || '/generation/*/*.parquet') g
    WHERE g.id IN (SELECT unnest(generations) FROM m UNION SELECT unnest(answers) FROM m)
),
-- A checkpoint's adapter blob is the BLAKE3 of the adapter file its model record names.
ck_start AS (
    SELECT c.* FROM read_parquet(getvariable('parquet') || '/checkpoint/*/*.parquet') c
    WHERE c.adapter IN (
        SELECT json_extract_string(md.config, '$.adapter.files[1].blake3') FROM gens
        JOIN read_parquet(getvariable('parquet') || '/model/*/*.parquet') md ON md.id = gens.model
    )
),
ck(id, dataset, parent, base_model, depth) AS (
    SELECT id, dataset, parent, base_model, 0 FROM ck_start
    UNION ALL
    SELECT c.id, c.dataset, c.parent, c.base_model, ck.depth + 1
    FROM read_parquet(getvariable('parquet') || '/checkpoint/*/*.parquet') c
    JOIN ck ON c.id = ck.parent
),
sets AS (
    SELECT DISTINCT q.id FROM read_parquet(getvariable('parquet') || '/question_set/*/*.parquet') q
    WHERE list_has_any(q.questions, (SELECT list(question) FROM gens))
),
ds(id, sources, parents, depth) AS (
    SELECT d.id, d.sources, d.parents, 0
    FROM read_parquet(getvariable('parquet') || '/dataset/*/*.parquet') d
    WHERE d.id IN (SELECT dataset FROM ck)
    UNION ALL
    SELECT q.id, q.sources, coalesce(q.parents, []), 0
    FROM read_parquet(getvariable('parquet') || '/question_set/*/*.parquet') q
    WHERE q.id IN (SELECT id FROM sets)
    UNION ALL
    SELECT p.id, p.sources, p.parents, ds.depth + 1
    FROM (
        SELECT id, sources, parents FROM read_parquet(getvariable('parquet') || '/dataset/*/*.parquet')
        UNION ALL
        SELECT id, sources, coalesce(parents, []) FROM read_parquet(getvariable('parquet') || '/question_set/*/*.parquet')
    ) p
    JOIN ds ON list_contains(ds.parents, p.id)
)
SELECT 'metric' AS kind, m.id, json_extract_string(m.definition, '$.definition') AS what, NULL AS blake3 FROM m
UNION ALL
SELECT 'generation', id, left(text, 40), NULL FROM gens
UNION ALL
SELECT DISTINCT 'model', md.id, md.name, NULL
FROM read_parquet(getvariable('parquet') || '/model/*/*.parquet') md WHERE md.id IN (SELECT model FROM gens)
UNION ALL
SELECT DISTINCT 'checkpoint', id, 'depth ' || depth, NULL FROM ck
UNION ALL
SELECT DISTINCT 'dataset', ds.id, coalesce(a.name, ''), NULL
FROM ds LEFT JOIN read_parquet(getvariable('parquet') || '/alias/data.parquet') a ON a.id = ds.id AND a.namespace = 'dataset'
UNION ALL
SELECT DISTINCT 'source', s.id, s.name, s.blake3
FROM read_parquet(getvariable('parquet') || '/source/*/*.parquet') s
WHERE s.id IN (SELECT unnest(sources) FROM ds)
ORDER BY kind, id;
