"""Downstream training (docs/downstream.md): linear probes (SLF, ALF), adversarial full
fine-tuning (AFF) and the from-scratch baseline.

One job per module: `augment` (standard crop + flip), `losses` (CE / TRADES / PGD-AT),
`trainer` (the classifier stages on the shared resumable loop, amoc.training),
`probe` / `finetune` (the entry points). The classifier and its file live in
amoc.nets.classifier; evaluation is its own stage (amoc.evaluate).
"""
