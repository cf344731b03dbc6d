"""The real datasets in their official layouts, and the papers' training pipelines."""
