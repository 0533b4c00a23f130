"""Everything that knows Ovis-U1: its declared architecture, config, modeling files, processing, checkpoints,
precision tables and memory profile."""

from quant.backends.bnb import quiet_import_logs

quiet_import_logs()  # before diffusers (imported by the modeling code) imports bitsandbytes
