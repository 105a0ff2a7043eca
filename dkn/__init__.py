"""dkn: find where a language model stores a fact, cluster those neurons into
degenerate groups, and prove it by switching them off and on.

Implements Chen et al. 2024, "The Da Vinci Code of Large Pre-trained Language
Models: Deciphering Degenerate Knowledge Neurons", on top of integrated-gradients
knowledge neurons (Dai et al. 2022).  Start here:

    from dkn.models import load_model                 # "default", an HF id, or a folder
    from dkn.attribution import attribute             # scores of every MLP neuron
    from dkn.selection import find_knowledge_neurons  # refined over paraphrases
    from dkn.degeneracy import analyse                # groups, subset grid, degeneracy test
    from dkn.interventions import intervene           # suppress / amplify and compare

    lm = load_model("default")
    kns = find_knowledge_neurons(lm, ["The capital of France is", "France's capital is"], "Paris")
    result = analyse(lm, "The capital of France is", "Paris", kns.neurons, kns.scores)
    print(result.verdict)

docs/method.md says what each step computes and where it differs from the paper's scripts.
"""

__version__ = "0.1.0"

from dkn.neurons import Neuron, parse_neurons  # noqa: F401
