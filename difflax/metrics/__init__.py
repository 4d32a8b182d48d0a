"""Sample-quality metrics: Frechet distances (FID with the FID Inception, fd_digits and
fd_mnist with small classifiers), class accuracy, reference statistics, batched evaluation,
bootstrap / seed intervals, and LPIPS."""
from difflax.metrics.classifier import TrainedClassifier, default_cache_dir
from difflax.metrics.confidence import (CLAIMS, bootstrap_interval, claim_verdict, format_interval,
                                        frechet_difference_interval, frechet_jackknife_interval,
                                        mean_interval)
from difflax.metrics.digits_features import (
    DigitsClassifier,
    class_accuracy,
    digits_features,
    digits_logits,
    digits_reference_stats,
    load_digits_classifier,
    real_digits,
    train_digits_classifier,
)
from difflax.metrics.evaluate import (
    DATASET_METRICS,
    DatasetMetric,
    FrechetMetric,
    dataset_metric,
    dataset_stats,
    digits_frechet_metric,
    evaluate_digits,
    evaluate_mnist,
    evaluate_samples,
    mnist_frechet_metric,
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
from difflax.metrics.mnist_features import (
    MnistClassifier,
    load_mnist_classifier,
    mnist_class_accuracy,
    mnist_features,
    mnist_logits,
    mnist_reference_stats,
    train_mnist_classifier,
)
from difflax.metrics.sample_store import SampleStore, fingerprint
from difflax.metrics.lpips import LPIPS, get_lpips_fn, load_lpips, random_lpips_params
from difflax.metrics.inception import (
    FID_WEIGHTS_URL,
    InceptionV3FID,
    convert_inception_weights,
    inception_features,
    load_inception,
)

__all__ = [
    "TrainedClassifier", "default_cache_dir", "SampleStore", "fingerprint",
    "CLAIMS", "bootstrap_interval", "claim_verdict", "format_interval",
    "frechet_difference_interval",
    "frechet_jackknife_interval", "mean_interval",
    "DigitsClassifier", "class_accuracy",
    "digits_features", "digits_logits", "digits_reference_stats", "load_digits_classifier",
    "real_digits", "train_digits_classifier",
    "MnistClassifier", "load_mnist_classifier", "mnist_class_accuracy", "mnist_features",
    "mnist_logits", "mnist_reference_stats", "train_mnist_classifier",
    "DATASET_METRICS", "DatasetMetric", "FrechetMetric", "dataset_metric", "dataset_stats", "digits_frechet_metric", "evaluate_digits",
    "evaluate_mnist", "evaluate_samples", "mnist_frechet_metric", "inception_frechet_metric", "quantize_to_uint8_levels",
    "FeatureStats", "frechet_distance", "init_stats", "load_stats", "mean_cov", "merge_stats",
    "save_stats", "stats_mean_cov", "update_stats",
    "FID_WEIGHTS_URL", "InceptionV3FID", "convert_inception_weights", "inception_features",
    "load_inception",
    "LPIPS", "get_lpips_fn", "load_lpips", "random_lpips_params",
]
