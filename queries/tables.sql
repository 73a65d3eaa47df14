-- Row count per exported table.
-- Run from the repository root:
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/tables.sql"
-- (the variable names the export directory; every query in queries/ reads it).
SELECT 'bench' AS "table", count(*) AS records FROM read_parquet(getvariable('parquet') || '/bench/*/*.parquet')
UNION ALL SELECT 'checkpoint', count(*) FROM read_parquet(getvariable('parquet') || '/checkpoint/*/*.parquet')
UNION ALL SELECT 'conversation', count(*) FROM read_parquet(getvariable('parquet') || '/conversation/*/*.parquet')
UNION ALL SELECT 'dataset', count(*) FROM read_parquet(getvariable('parquet') || '/dataset/*/*.parquet')
UNION ALL SELECT 'direction', count(*) FROM read_parquet(getvariable('parquet') || '/direction/*/*.parquet')
UNION ALL SELECT 'generation', count(*) FROM read_parquet(getvariable('parquet') || '/generation/*/*.parquet')
UNION ALL SELECT 'judgment', count(*) FROM read_parquet(getvariable('parquet') || '/judgment/*/*.parquet')
UNION ALL SELECT 'message', count(*) FROM read_parquet(getvariable('parquet') || '/message/*/*.parquet')
UNION ALL SELECT 'metric', count(*) FROM read_parquet(getvariable('parquet') || '/metric/*/*.parquet')
UNION ALL SELECT 'model', count(*) FROM read_parquet(getvariable('parquet') || '/model/*/*.parquet')
UNION ALL SELECT 'question', count(*) FROM read_parquet(getvariable('parquet') || '/question/*/*.parquet')
UNION ALL SELECT 'question_set', count(*) FROM read_parquet(getvariable('parquet') || '/question_set/*/*.parquet')
UNION ALL SELECT 'run', count(*) FROM read_parquet(getvariable('parquet') || '/run/*/*.parquet')
UNION ALL SELECT 'source', count(*) FROM read_parquet(getvariable('parquet') || '/source/*/*.parquet')
UNION ALL SELECT 'step', count(*) FROM read_parquet(getvariable('parquet') || '/step/*/*.parquet')
UNION ALL SELECT 'study', count(*) FROM read_parquet(getvariable('parquet') || '/study/*/*.parquet')
UNION ALL SELECT 'study_step', count(*) FROM read_parquet(getvariable('parquet') || '/study_step/*/*.parquet')
ORDER BY 1;
