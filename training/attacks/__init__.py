"""Attacks in [0, 1] pixel space (PROTOCOL.md): PGD L-inf and L2."""

from training.attacks.pgd import PAPER_L2, PAPER_LINF, pgd
from training.config import AttackConfig

__all__ = ["AttackConfig", "PAPER_L2", "PAPER_LINF", "pgd"]
