"""The discretized location-scale mixture heads' machinery, one file per job.

* ``formula.py``: the likelihood, written once for every family and implementation (binning,
  coupling, one component's bin mass, the mixture posterior);
* ``logistic.py``, ``gaussian.py``: each family's continuous distribution and constants;
* ``layout.py``: where the parameters sit along the channel axis;
* ``distribution.py``: the distribution and head base classes (sampling, summaries, the table
  of implementations);
* ``lean.py``: the memory-lean implementation (one autograd node over the components);
* ``triton.py``, ``triton_kernels.py``: the logistic family as Triton kernels.

The public classes are ``discretelik.DiscretizedLogisticMixture(Distribution)`` and
``discretelik.DiscretizedGaussian(Distribution)``.
"""
