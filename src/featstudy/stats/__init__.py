"""featstudy's statistics engine: pure numpy/scipy/numba, usable on any matrix in a notebook.

- :func:`signed_ks` — signed two-sample KS statistic for every (feature, class) pair (paper Eq. 3), exact or
  binned; :func:`signed_ks_random` — the same for seeded randomized labels (:func:`permuted_labels`).
- :func:`thresholds` — d_avg curves and the thresholds t+, t− (paper Eq. 4, Table 4);
  :func:`irrelevant_features`, :func:`kept_fraction_by_layer` (§5.5, Fig. 10).
- :func:`ks_pvalues`, :func:`bh_qvalues`, :func:`expected_count_above` — the analytic null.
- :func:`binned_vs_exact` — what the paper's binning costs.
- :func:`class_auroc` — the class-vs-rest AUROC of every (feature, class) pair, from exact midranks;
  :func:`selectivity_index` — the class selectivity index of every feature (Morcos et al. 2018).
- :func:`bootstrap_thresholds` — stratified percentile bootstrap intervals for t+ and t−.
"""

from featstudy.stats.auroc import AUROCResult, class_auroc
from featstudy.stats.bootstrap import BootstrapResult, bootstrap_thresholds
from featstudy.stats.compare import BinningReport, binned_vs_exact
from featstudy.stats.ks import KSResult, signed_ks, signed_ks_random
from featstudy.stats.null import bh_qvalues, expected_count_above, ks_pvalues
from featstudy.stats.permutation import permuted_labels
from featstudy.stats.selectivity import SelectivityResult, selectivity_index
from featstudy.stats.thresholds import ThresholdResult, irrelevant_features, kept_fraction_by_layer, thresholds

__all__ = [
    "AUROCResult",
    "BinningReport",
    "BootstrapResult",
    "KSResult",
    "SelectivityResult",
    "ThresholdResult",
    "binned_vs_exact",
    "bh_qvalues",
    "bootstrap_thresholds",
    "class_auroc",
    "expected_count_above",
    "irrelevant_features",
    "kept_fraction_by_layer",
    "ks_pvalues",
    "permuted_labels",
    "selectivity_index",
    "signed_ks",
    "signed_ks_random",
    "thresholds",
]
