"""Result processing of the movie-review lm-eval tasks (``!function movie_reviews.…``)."""


def process_completion(doc, results):
    """Per-byte scores of the review's log-likelihood, for the ``bits_per_byte`` and
    ``weighted_perplexity`` aggregations (a sum of log-likelihoods over a sum of bytes)."""
    loglikelihood, _is_greedy = results[0]
    n_bytes = len((" " + doc["completion"]).encode("utf-8"))  # the scored text: " " + review
    return {
        "bits_per_byte": (loglikelihood, n_bytes),
        "byte_perplexity": (loglikelihood, n_bytes),
    }
