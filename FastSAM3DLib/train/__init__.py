"""Training: a prepared crop pool, click-simulated interactive training, layer-wise distillation,
DDP helpers and the export of bundled weights. Imports nothing heavy at package import time."""
