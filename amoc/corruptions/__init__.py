"""Corruption robustness (CIFAR-10-C / CIFAR-100-C) and black-box transfer attacks.

- `corrupt` (+ `filters`): the 15 standard corruptions, severities 1-5, uint8 in and out.
- `stage`: `amoc corruptions`, the corrupted test set in the CIFAR-10-C `layout`, either
  generated offline or taken from the `official` archive (resumable `fetch_resume`).
- `evaluate`: `amoc evaluate --corruptions DIR`, accuracy per corruption and severity.
- `transfer`: `amoc transfer`, PGD examples from source models scored on every model,
  with a gradient-masking flag.
- `plots`: heat-maps and markdown tables for the report.
"""
