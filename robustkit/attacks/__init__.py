"""Attack interface and robustkit's own native attacks."""
from robustkit.attacks.base import Attack, AttackResult

__all__ = ["Attack", "AttackResult"]
