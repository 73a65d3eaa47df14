-- What each study found: EM% by study, eval, stage (with seeds and checkpoint step),
-- condition and definition, with the 95% interval, from the metric records the study's own
-- metrics steps wrote. The same numbers as `emlab compare --json` (its `em` entries).
-- Run `emlab run SPEC` and `emlab export` first.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/study.sql"
WITH studies AS (
    SELECT name AS study, unnest(steps) AS step_id
    FROM read_parquet(getvariable('parquet') || '/study/*/*.parquet')
),
steps AS (
    SELECT s.study, st.params, unnest(st.outputs) AS metric_id
    FROM studies s
    JOIN read_parquet(getvariable('parquet') || '/study_step/*/*.parquet') st ON st.id = s.step_id
    WHERE st.kind = 'metrics'
)
SELECT steps.study,
       json_extract_string(steps.params, '$.eval') AS eval,
       json_extract_string(steps.params, '$.stage') AS stage,
       json_extract(steps.params, '$.seeds')::VARCHAR AS seeds,
       json_extract(steps.params, '$.checkpoint')::BIGINT AS checkpoint,
       json_extract_string(steps.params, '$.condition') AS condition,
       json_extract_string(m.definition, '$.definition') AS definition,
       m.value,
       m.ci_low,
       m.ci_high,
       m.n,
       m.misaligned,
       m.id AS metric
FROM steps
JOIN read_parquet(getvariable('parquet') || '/metric/*/*.parquet') m ON m.id = steps.metric_id
WHERE m.scope = 'overall'
ORDER BY steps.study, eval, stage, seeds, checkpoint, condition, definition;
