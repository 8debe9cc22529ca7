"""Data in: clean sources, their manifest, synthesis into shards, reading shards and paired folders."""
