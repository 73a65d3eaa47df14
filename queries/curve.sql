-- EM% (Betley) and the likelihood probe against training step: every evaluated checkpoint
-- of every study (an eval with checkpoints = "every" gives one point per saved checkpoint).
-- `measure` is the definition's name for EM%, or `probe:<eval>` for a probe.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/curve.sql"
WITH studies AS (
    SELECT name AS study, unnest(steps) AS step_id
    FROM read_parquet(getvariable('parquet') || '/study/*/*.parquet')
),
steps AS (
    SELECT s.study, st.kind, st.params, unnest(st.outputs) AS metric_id
    FROM studies s
    JOIN read_parquet(getvariable('parquet') || '/study_step/*/*.parquet') st ON st.id = s.step_id
    WHERE st.kind IN ('metrics', 'probe')
      AND json_extract(st.params, '$.checkpoint') IS NOT NULL
      AND json_extract(st.params, '$.checkpoint')::VARCHAR != 'null'
)
SELECT steps.study,
       json_extract_string(steps.params, '$.stage') AS stage,
       json_extract(steps.params, '$.seeds')::VARCHAR AS seeds,
       json_extract(steps.params, '$.checkpoint')::BIGINT AS step,
       CASE WHEN steps.kind = 'probe' THEN 'probe:' || json_extract_string(steps.params, '$.eval')
            ELSE json_extract_string(m.definition, '$.definition') END AS measure,
       coalesce(json_extract_string(steps.params, '$.condition'), '') AS condition,
       m.value,
       m.ci_low,
       m.ci_high,
       m.n,
       m.id AS metric
FROM steps
JOIN read_parquet(getvariable('parquet') || '/metric/*/*.parquet') m ON m.id = steps.metric_id
WHERE m.scope = 'overall'
  AND (steps.kind = 'probe' OR json_extract_string(m.definition, '$.definition') = 'betley')
ORDER BY steps.study, stage, seeds, measure, condition, step;
