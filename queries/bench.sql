-- Benchmark results across commits, newest first, with the headline figure of each and the
-- CPU and kernel paths it was measured on (compare figures only within one cpu + kernels).
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/bench.sql"
SELECT time,
       name,
       left(commit, 10) AS commit,
       json_extract_string(machine, '$.cpu') AS cpu,
       concat_ws(' ', json_extract_string(machine, '$.kernels.quant'),
                 json_extract_string(machine, '$.kernels.f32'),
                 json_extract_string(machine, '$.kernels.bf16')) AS kernels,
       coalesce(json_extract(results, '$.useful_tokens_per_s'),
                json_extract(results, '$.judgments_per_s'),
                json_extract(results, '$.rows_per_s_median'),
                json_extract(results, '$.ingest.records_per_s_median'),
                json_extract(results, '$.decode_tokens_per_s'),
                json_extract(results, '$.tokens_per_s'))::DOUBLE AS per_s,
       results
FROM read_parquet(getvariable('parquet') || '/bench/*/*.parquet')
ORDER BY time DESC;
