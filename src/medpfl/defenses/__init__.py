"""Defenses: transforms of each site's update (stacked over sites on dim 0), DP-SGD and privacy accounting."""

from medpfl.defenses.accounting import ACCOUNTANTS, PrivacyLedger, epsilon_spent, noise_for_epsilon
from medpfl.defenses.base import STAGES, Defense, Update
from medpfl.defenses.chain import Chain
from medpfl.defenses.client_dp import ClientLevelDP
from medpfl.defenses.clip import ClipNorm
from medpfl.defenses.dpsgd import DPSGD, per_example_gradients, refuse_batchnorm
from medpfl.defenses.noise import GaussianNoise, LaplaceNoise
from medpfl.defenses.quantize import Quantize
from medpfl.defenses.secagg import SecureAggregation
from medpfl.defenses.spec import DEFENSES, parse_defense, parse_defenses
from medpfl.defenses.topk import TopK

__all__ = ["ACCOUNTANTS", "DEFENSES", "DPSGD", "STAGES", "Chain", "ClientLevelDP", "ClipNorm", "Defense",
           "GaussianNoise", "LaplaceNoise", "PrivacyLedger", "Quantize", "SecureAggregation", "TopK", "Update",
           "epsilon_spent", "noise_for_epsilon", "parse_defense", "parse_defenses", "per_example_gradients",
           "refuse_batchnorm"]
