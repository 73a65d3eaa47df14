-- Every named dataset and question set: rows, how it was made, and its parents' names.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/datasets.sql"
WITH names AS (
    SELECT name, id FROM read_parquet(getvariable('parquet') || '/alias/data.parquet')
    WHERE namespace = 'dataset'
),
sets AS (
    SELECT id, kind, len(rows) AS rows, op, parents
    FROM read_parquet(getvariable('parquet') || '/dataset/*/*.parquet')
    UNION ALL
    SELECT id, 'questions', len(questions), op, []::VARCHAR[]
    FROM read_parquet(getvariable('parquet') || '/question_set/*/*.parquet')
)
SELECT n.name,
       s.kind,
       s.rows,
       json_extract_string(s.op, '$.op') AS made_by,
       coalesce(json_extract_string(s.op, '$.format'),
                array_to_string(CAST(json_extract_string(s.op, '$.steps[*].op') AS VARCHAR[]), ' > ')) AS how,
       (SELECT string_agg(p.name, ', ') FROM names p WHERE list_contains(s.parents, p.id)) AS parents
FROM names n JOIN sets s ON s.id = n.id
ORDER BY n.name;
