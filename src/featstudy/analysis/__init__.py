"""Analyses run after extraction, as callbacks instantiated from ``conf/analysis`` (one module each).

Each callback reads the cached embedding through an :class:`~featstudy.analysis.base.AnalysisContext`, calls
:mod:`featstudy.stats`, writes its files under the run's output folder and returns metrics, curves and the list of
files; :mod:`featstudy.app` then hands those to :mod:`featstudy.tracking`.

========== ==================================== ==========================================================
callback   module                               writes
========== ==================================== ==========================================================
ks         :mod:`featstudy.analysis.ks`         ``arrays/ks.npz`` (D, D+, D- real and randomized)
thresholds :mod:`featstudy.analysis.thresholds` ``tables/table3.csv``, ``tables/table4.csv``, d_avg curves
figures    :mod:`featstudy.analysis.figures`    ``figures/fig{1,2,3,5,6,9,10}.{png,pdf}``
null       :mod:`featstudy.analysis.null`       ``tables/null_by_layer.csv`` (BH q-values, q < 0.05 share)
atlas      :mod:`featstudy.analysis.atlas`      ``atlas/index.html`` + ``atlas/img/`` (one page to browse D)
========== ==================================== ==========================================================
"""

from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult, instantiate_callbacks

__all__ = ["AnalysisCallback", "AnalysisContext", "CallbackResult", "instantiate_callbacks"]
