"""Downstream protocols (spec sections 6-7): linear probes (SLF, ALF), adversarial full
fine-tuning (AFF) and the from-scratch baseline, their evaluation and the report.

One job per module: `classifier` (the model and its file), `augment` (standard crop +
flip), `losses` (CE / TRADES / PGD-AT and their training-time attacks), `trainer` (the
resumable loop), `probe` / `finetune` / `evaluate` / `report` (the stage entry points).
"""
