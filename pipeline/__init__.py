"""qkov pipeline: job spec, store schema, Dask stages (extract, score, stats), CLI, reports."""
