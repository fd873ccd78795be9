"""The federated run's streams now live in medpfl.seeds; this name stays for the callers that still import it."""

from medpfl.seeds import (ATTACK, MODEL_INIT, PARTITION, SHUFFLE, SITE_NOISE, model_seed, rng,  # noqa: F401
                          site_order, torch_seed)
