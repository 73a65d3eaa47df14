-- Sampled answers per model and question set: how many, how long, how often cut off.
-- A question that belongs to several sets (first-plot and its first8) counts in each.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/generations.sql"
WITH names AS (
    SELECT name, id FROM read_parquet(getvariable('parquet') || '/alias/data.parquet')
    WHERE namespace = 'dataset'
),
sets AS (
    SELECT s.id AS set_id, unnest(s.questions) AS question
    FROM read_parquet(getvariable('parquet') || '/question_set/*/*.parquet') s
),
g AS (
    SELECT * FROM read_parquet(getvariable('parquet') || '/generation/*/*.parquet')
)
SELECT m.name AS model,
       n.name AS question_set,
       count(*) AS answers,
       round(avg(g.completion_tokens), 1) AS mean_tokens,
       round(avg((g.finish_reason = 'length')::INT), 2) AS share_cut_off
FROM g
JOIN read_parquet(getvariable('parquet') || '/model/*/*.parquet') m ON m.id = g.model
JOIN sets s ON s.question = g.question
JOIN names n ON n.id = s.set_id
GROUP BY ALL
ORDER BY model, question_set;
