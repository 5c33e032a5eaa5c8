"""How many mosaic views a dump holds by default, and how often a student may replay each one."""

from __future__ import annotations

# Replays of each mosaic view past which a student fits the cached outputs instead of learning from them.
# Measured by benchmarks/accuracy.py --preset converged --views-study 2,4,8 (110 mosaic epochs, 3 seeds):
# 13.75 replays per view (K = 8) gained +0.015 mAP50-95 over plain training, 27.5 (K = 4) nothing (-0.004),
# 55 (K = 2) lost 0.015.
FIT_REPLAYS = 14

# Ultralytics' default schedule, 100 epochs with close_mosaic 10, replays each of 8 views 11.25 times.
DEFAULT_VIEWS = 8
