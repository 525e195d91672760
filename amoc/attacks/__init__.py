"""The attack toolkit: every attack and every accuracy count in amoc goes through here.

- `pgd`: L-inf PGD with an injectable objective (`pgd_linf`), its data-parallel random
  start (`global_start`) and `pgd` for an AttackConfig.
- `ce`: the cross-entropy objective (`ce_pgd`: PGD-AT, PGD-20 evaluation, transfer).
- `accuracy`: batched per-image correctness, clean or under an attack.
- `autoattack`: standard AutoAttack (torchattacks), configured as the original.

The pre-training attack (the contrastive objective) lives with pre-training
(amoc.pretrain.attack) and calls `pgd` here.
"""

from amoc.attacks.pgd import pgd, pgd_linf

__all__ = ["pgd", "pgd_linf"]
