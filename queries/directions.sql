-- Misalignment directions (`emlab activations`): the norm of each at every measured layer,
-- with the group sizes and the model it was computed on; where the direction is strongest.
--   duckdb -c "SET VARIABLE parquet = 'emlab-store/parquet'" -c ".read queries/directions.sql"
SELECT name, substr(id, 1, 12) AS direction, substr(model, 1, 12) AS model,
       n_misaligned, n_aligned,
       unnest(layers) AS layer, unnest(norms) AS norm
FROM read_parquet(getvariable('parquet') || '/direction/*/*.parquet')
ORDER BY name, direction, layer;
