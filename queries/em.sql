-- The cross-experiment comparison: % misaligned per model and definition (overall), with the
-- bootstrap 95% interval. Run `emlab metrics` and `emlab export` first. Metric records
-- computed with other bootstrap settings for the same answers are deduplicated to one row.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/em.sql"
WITH m AS (
    SELECT * FROM read_parquet(getvariable('parquet') || '/metric/*/*.parquet')
    WHERE scope = 'overall'
)
SELECT md.name AS model,
       m.judge,
       json_extract_string(m.definition, '$.definition') AS definition,
       round(100 * m.value, 1) AS em_pct,
       round(100 * m.ci_low, 1) AS ci_low,
       round(100 * m.ci_high, 1) AS ci_high,
       m.n,
       m.misaligned
FROM m
JOIN read_parquet(getvariable('parquet') || '/model/*/*.parquet') md ON md.id = m.model
WHERE m.n > 0
QUALIFY row_number() OVER (PARTITION BY m.model, m.judge, m.definition ORDER BY m.id) = 1
ORDER BY model, definition;
