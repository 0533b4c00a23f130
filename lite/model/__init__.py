"""Everything that knows Ovis-U1: its declared architecture, config, modeling files, processing, checkpoints,
precision tables and memory profile."""
