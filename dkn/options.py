"""The option lists every front end offers (CLI `choices=`, the app's pickers), with their labels.

One tuple per option, torch-free so that the CLI can build its parser (and answer cached requests)
without importing the model code.  The modules that implement the options validate against these:
`tests/test_cli.py::test_option_lists_match_the_library` checks that `dkn.attribution.METHODS`,
`BASELINES`, `dkn.interventions.MODES` and `dkn.degeneracy.CLUSTERER_NAMES` are these same tuples.
"""

from __future__ import annotations

from dkn.integration import RULES  # noqa: F401  (the quadrature rules are defined with their code)
from dkn.topology import CLUSTERERS as _TOPOLOGY_CLUSTERERS

#: Attribution methods (dkn.attribution), with the app's labels.
METHOD_LABELS = {
    "ig": "Integrated gradients",
    "grad_x_act": "Gradient × activation (fast)",
    "activation": "Activation only",
}
METHODS = tuple(METHOD_LABELS)

#: The default integration rule and its number of points: the adaptive trapezoid rule from 4 intervals per layer
#: (dkn.integration) is the cheapest rule at least as accurate as the knowledge-neurons peer's 20 evenly spaced
#: points (bench/results/quadrature.md: 20 facts of the default model against a 512-point reference): as fast
#: as trapezoid-10 there (1.00 s vs 0.98 s; it refines layer 0, whose integrand has sharp features) with a
#: max relative error of 2.7e-2 instead of 0.20 (the peer's: 0.24).  trapezoid-10 was the default before it,
#: midpoint-20 before that.
DEFAULT_RULE, DEFAULT_STEPS = "adaptive", 4
#: Points of the other rules when none are given (the peer's 20; midpoint-20 was the default before).
OTHER_RULES_STEPS = 20


def default_steps(rule: str) -> int:
    """How many points (intervals for the trapezoid and adaptive rules) `rule` takes when none are given."""
    return DEFAULT_STEPS if rule == DEFAULT_RULE else OTHER_RULES_STEPS


#: Integrated-gradients baselines: zero (Dai et al.) or AMIG (Chen et al.).
BASELINES = ("zero", "amig")

#: Where an intervention acts (dkn.interventions), with the app's labels.
MODE_LABELS = {"last": "answer position", "all": "every position", "weights": "weights"}
MODES = tuple(MODE_LABELS)

#: Methods that propose candidate groups: dkn.topology's clusterers, plus "amig" (AMIG's pair definition,
#: dkn.degeneracy) and "backup" (conditional attribution rounds, dkn.backup).
CLUSTERERS = tuple(_TOPOLOGY_CLUSTERERS) + ("amig", "backup")

#: Edge definitions of the knowledge-neuron graph (dkn.graph.EDGES).
EDGES = ("static", "functional", "faithful")

#: Devices and weight precisions of dkn.models.load_model (attribution accumulates in float32 anyway).
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")

#: Analysis experiments (dkn.experiments.runner.EXPERIMENTS).
EXPERIMENTS = ("acquisition", "robustness", "enhancement", "fact_checking", "evolvability", "complexity")
