from amoc.attacks.pgd import pgd_linf

__all__ = ["pgd_linf"]
