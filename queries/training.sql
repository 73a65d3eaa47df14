-- Fine-tuning: every checkpoint with its base model, training set, parent checkpoint, steps,
-- last training loss, first and last held-out loss, and the mean training speed of its run.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/training.sql"
WITH names AS (
    SELECT name, id FROM read_parquet(getvariable('parquet') || '/alias/data.parquet')
    WHERE namespace = 'dataset'
),
ck AS (
    SELECT * FROM read_parquet(getvariable('parquet') || '/checkpoint/*/*.parquet')
),
models AS (
    SELECT id, name FROM read_parquet(getvariable('parquet') || '/model/*/*.parquet')
)
SELECT left(ck.id, 12) AS checkpoint,
       m.name AS base_model,
       coalesce(n.name, left(ck.dataset, 12)) AS dataset,
       left(ck.parent, 12) AS parent,
       json_extract_string(ck.config, '$.preset') AS preset,
       ck.step,
       round(ck.loss_curve[len(ck.loss_curve)], 4) AS last_loss,
       round(json_extract(ck.eval_loss, '$[0][1]')::DOUBLE, 4) AS eval_loss_first,
       round(json_extract(ck.eval_loss, '$[#-1][1]')::DOUBLE, 4) AS eval_loss_last,
       json_extract(ck.data_stats, '$.truncated')::INT AS truncated_rows
FROM ck
LEFT JOIN models m ON m.id = ck.base_model
LEFT JOIN names n ON n.id = ck.dataset
ORDER BY m.name, dataset, ck.step;
