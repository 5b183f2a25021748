"""Finite-population gradient estimation: sampling designs, survey estimators, auxiliary models."""

from probopt.sampling.auxiliary import (
    Auxiliary,
    GradientFactorTable,
    OnlineLinearModel,
    make_auxiliary,
)
from probopt.sampling.designs import (
    DesignBatchSampler,
    EpochBatchSampler,
    PoissonSampling,
    PPSWithReplacement,
    Sample,
    SamplingDesign,
    SimpleRandomSampling,
    StratifiedSampling,
    WithReplacementSample,
)
from probopt.sampling.estimators import (
    difference_estimator,
    greg,
    greg_coefficients,
    greg_weights,
    hajek,
    hansen_hurwitz,
    hansen_hurwitz_weights,
    horvitz_thompson,
    horvitz_thompson_weights,
)
from probopt.sampling.importance import ImportanceEstimator, PresampleImportanceEstimator
from probopt.sampling.importance_design import ScoreTable, draw_probabilities
from probopt.sampling.importance_tau import tau
from probopt.sampling.importance_weights import (
    diagnose_weights,
    kish_ess,
    pareto_khat,
    trace_variances,
)
from probopt.sampling.model_assisted import (
    CachedGradientEstimator,
    DifferenceEstimator,
    GREGEstimator,
    train_epoch,
)
from probopt.sampling.per_example import (
    LinearGradCapture,
    grad_norms,
    last_layer_grads,
    per_example_grads,
)
from probopt.sampling.registry import estimator_names, make_estimator
from probopt.sampling.scores import (
    DenseNormCapture,
    exact_grad_norms,
    score_examples,
)
from probopt.sampling.variance import (
    design_variance,
    difference_variance,
    greg_design_variance,
    greg_variance,
    hajek_variance,
    hansen_hurwitz_design_variance,
    hansen_hurwitz_variance,
    horvitz_thompson_design_variance,
    horvitz_thompson_variance,
    sen_yates_grundy_design_variance,
    sen_yates_grundy_variance,
    srs_design_variance,
    srs_variance,
)

__all__ = [
    # every estimator by name (probopt.sampling.registry)
    "estimator_names",
    "make_estimator",
    # auxiliary data and working model (probopt.sampling.auxiliary)
    "Auxiliary",
    "GradientFactorTable",
    "OnlineLinearModel",
    "make_auxiliary",
    # model-assisted estimators (probopt.sampling.model_assisted)
    "CachedGradientEstimator",
    "DifferenceEstimator",
    "GREGEstimator",
    "train_epoch",
    # importance sampling (probopt.sampling.importance: estimators; importance_design: q and
    # the score table; importance_tau: when it pays; importance_weights: weight diagnostics)
    # and its scores (probopt.sampling.scores)
    "ImportanceEstimator",
    "PresampleImportanceEstimator",
    "ScoreTable",
    "diagnose_weights",
    "draw_probabilities",
    "kish_ess",
    "pareto_khat",
    "tau",
    "trace_variances",
    "DenseNormCapture",
    "exact_grad_norms",
    "score_examples",
    # per-example gradients (probopt.sampling.per_example)
    "LinearGradCapture",
    "grad_norms",
    "last_layer_grads",
    "per_example_grads",
    # designs (probopt.sampling.designs)
    "DesignBatchSampler",
    "EpochBatchSampler",
    "PPSWithReplacement",
    "PoissonSampling",
    "Sample",
    "SamplingDesign",
    "SimpleRandomSampling",
    "StratifiedSampling",
    "WithReplacementSample",
    # estimators (probopt.sampling.estimators)
    "difference_estimator",
    "greg",
    "greg_coefficients",
    "greg_weights",
    "hajek",
    "hansen_hurwitz",
    "hansen_hurwitz_weights",
    "horvitz_thompson",
    "horvitz_thompson_weights",
    # variances (probopt.sampling.variance)
    "design_variance",
    "difference_variance",
    "greg_design_variance",
    "greg_variance",
    "hajek_variance",
    "hansen_hurwitz_design_variance",
    "hansen_hurwitz_variance",
    "horvitz_thompson_design_variance",
    "horvitz_thompson_variance",
    "sen_yates_grundy_design_variance",
    "sen_yates_grundy_variance",
    "srs_design_variance",
    "srs_variance",
]
