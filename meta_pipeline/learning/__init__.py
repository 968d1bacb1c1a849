"""Pure cores of the learning jobs (numpy/pandas/scipy, no Dagster)."""

from meta_pipeline.learning.factors import compute_latent_factors, find_latent_factors
from meta_pipeline.learning.lessons import compute_edge_history, edge_history, match_lessons, mine_lessons
from meta_pipeline.learning.overrides import OverrideModel, materialize_overrides, predict, predict_sum_all_lessons
from meta_pipeline.learning.predict import predict_file, predict_trades
from meta_pipeline.learning.regime import fit_regime_weights, metric_term

__all__ = [
    "OverrideModel",
    "predict_file",
    "predict_trades",
    "compute_edge_history",
    "compute_latent_factors",
    "edge_history",
    "find_latent_factors",
    "fit_regime_weights",
    "match_lessons",
    "materialize_overrides",
    "metric_term",
    "mine_lessons",
    "predict",
    "predict_sum_all_lessons",
]
