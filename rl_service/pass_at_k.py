"""pass@k and mean@k of sampled evaluation (pure math, no Ray).

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", eq. 1): from n samples of a prompt of which c are correct, the chance that at least one of k
samples drawn without replacement is correct, 1 − C(n−c, k) / C(n, k), averaged over prompts. It
is computed as the product 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms the binomials (they
overflow a float for n in the hundreds). mean@k is the mean accuracy of the k samples (the
expected pass@1), the figure reasoning papers report beside pass@k.
"""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt: n samples, c of them correct, 1 <= k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:      # fewer wrong samples than k: every draw of k holds a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def sampled_eval_metrics(rewards, request_index, num_prompts: int, samples: int, prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_pass_at_{k'}` for every k' <= samples and `{prefix}_mean_at_{samples}` from a sampled
    evaluation: `rewards[j]` (1 = correct, anything > 0.5 counts) of the sample of prompt
    `request_index[j]`, `samples` per prompt. Keys avoid '@' (TensorBoard rewrites it in tags)."""
    index = np.asarray(request_index, dtype=np.int64)
    correct = np.asarray(rewards, dtype=np.float64) > 0.5
    per_prompt = np.bincount(index, minlength=num_prompts)
    if per_prompt.size != num_prompts or np.any(per_prompt != samples):
        raise ValueError(f"sampled evaluation: every prompt needs {samples} samples, got counts "
                         f"{sorted(set(per_prompt.tolist()))}")
    hits = np.bincount(index, weights=correct, minlength=num_prompts).astype(np.int64)
    metrics = {f"{prefix}_pass_at_{k}": float(np.mean([pass_at_k(samples, int(c), k) for c in hits]))
               for k in range(1, samples + 1)}
    metrics[f"{prefix}_mean_at_{samples}"] = float(correct.mean())
    return metrics
