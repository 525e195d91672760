"""`amoc evaluate`: how a trained classifier holds up on the test set.

- `stage`: the entry point; attacks by default, corrupted sets with `--corruptions DIR`.
- `attacks`: clean, PGD-20 and AutoAttack accuracy and the robustness curve (eval.json, curve.csv).
- `corruptions`: accuracy per corruption and severity (corruptions.json, corruptions.csv).
"""
