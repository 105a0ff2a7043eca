"""dkn: find where a language model stores a fact, cluster those neurons into
degenerate groups, and prove it by switching them off and on.

Implements Chen et al. 2024, "The Da Vinci Code of Large Pre-trained Language
Models: Deciphering Degenerate Knowledge Neurons", on top of integrated-gradients
knowledge neurons (Dai et al. 2022).
"""
__version__ = "0.1.0"

from dkn.neurons import Neuron, parse_neurons  # noqa: E402,F401
