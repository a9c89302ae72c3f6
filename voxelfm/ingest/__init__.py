"""Ingestion: manifest -> shards -> one Zarr store per shard, with QC and failure reports.

    read_manifest(path)                         validated manifest (manifest.py)
    split_manifest(manifest, n_shards, out_dir) shard_XXX.csv files (shards.py)
    run_shard(shard_csv, out_store, failures_csv, qc_csv, ...)   one shard (shards.py)
    summarize(store_paths, qc_csvs, failure_csvs, out_dir)      report + mosaic (summary.py)

No torch here: ingestion runs on CPU nodes without it.
"""
