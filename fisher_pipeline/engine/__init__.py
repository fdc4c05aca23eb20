"""Per-sample gradient engines: layer rules, hooks, losses."""
