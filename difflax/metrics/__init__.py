"""Sample-quality metrics: Frechet distances (FID with the FID Inception, fd_digits with a
small digits network), class accuracy, reference statistics, batched evaluation, and LPIPS."""
from difflax.metrics.digits_features import (
    DigitsClassifier,
    TrainedDigitsClassifier,
    class_accuracy,
    default_cache_dir,
    digits_features,
    digits_logits,
    digits_reference_stats,
    load_digits_classifier,
    real_digits,
    train_digits_classifier,
)
from difflax.metrics.evaluate import (
    FrechetMetric,
    dataset_stats,
    digits_frechet_metric,
    evaluate_digits,
    evaluate_samples,
    inception_frechet_metric,
    quantize_to_uint8_levels,
)
from difflax.metrics.frechet import (
    FeatureStats,
    frechet_distance,
    init_stats,
    load_stats,
    mean_cov,
    merge_stats,
    save_stats,
    stats_mean_cov,
    update_stats,
)
from difflax.metrics.lpips import LPIPS, get_lpips_fn, load_lpips, random_lpips_params
from difflax.metrics.inception import (
    FID_WEIGHTS_URL,
    InceptionV3FID,
    convert_inception_weights,
    inception_features,
    load_inception,
)

__all__ = [
    "DigitsClassifier", "TrainedDigitsClassifier", "class_accuracy", "default_cache_dir",
    "digits_features", "digits_logits", "digits_reference_stats", "load_digits_classifier",
    "real_digits", "train_digits_classifier",
    "FrechetMetric", "dataset_stats", "digits_frechet_metric", "evaluate_digits",
    "evaluate_samples", "inception_frechet_metric", "quantize_to_uint8_levels",
    "FeatureStats", "frechet_distance", "init_stats", "load_stats", "mean_cov", "merge_stats",
    "save_stats", "stats_mean_cov", "update_stats",
    "FID_WEIGHTS_URL", "InceptionV3FID", "convert_inception_weights", "inception_features",
    "load_inception",
    "LPIPS", "get_lpips_fn", "load_lpips", "random_lpips_params",
]
