"""The resumable training loop shared by every training stage (amoc.training.loop)."""
