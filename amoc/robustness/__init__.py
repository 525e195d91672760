"""Robustness beyond white-box attacks: common corruptions and black-box transfer.

- `corruptions`: `amoc corruptions`, the corrupted test set (amoc.data.corrupted layout),
  generated offline by `corrupt` (+ `filters`) or taken from the `official` archive
  (resumable download: `fetch_resume`). `amoc evaluate --corruptions` scores it.
- `transfer`: `amoc transfer`, PGD examples from source models scored on every model,
  with a gradient-masking flag.
"""
