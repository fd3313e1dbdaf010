"""What colluding trainers reach from their own public data alone, ignoring the protocol: the
floor an extraction attack must beat before it says anything about the run.

With the aux images (the first half of the test split) and the labels of the first n of them,
each baseline predicts the evaluation half's classes:
- `supervised`: logistic regression on the n labelled images (n > 0);
- `cluster-vote`: k-means on the aux images, each cluster named by the vote of its labelled
  members (a cluster without any takes the label of the labelled image nearest its centre);
  with no labels, clusters are matched to classes after the fact (Hungarian), as the unlabelled
  extraction is scored;
- `label-spreading`: semi-supervised label spreading over a k-nearest-neighbour graph of every
  aux image (Zhou et al. 2004, scikit-learn's `LabelSpreading`), n > 0.
Features are the images' first 50 principal components (fitted on the aux images). The best
of them is the baseline; an extraction is reported as its gain over it.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading

from clicooper_bus.audit import scoring

COMPONENTS = 50


def _features(aux: np.ndarray, evaluation: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a = aux.reshape(len(aux), -1).astype(np.float64)
    e = evaluation.reshape(len(evaluation), -1).astype(np.float64)
    pca = PCA(n_components=min(COMPONENTS, *a.shape), random_state=seed).fit(a)
    return pca.transform(a), pca.transform(e)


def _cluster_vote(fa: np.ndarray, fe: np.ndarray, labels: np.ndarray, n: int, k: int,
                  seed: int) -> np.ndarray:
    km = KMeans(n_clusters=k, n_init=5, random_state=seed).fit(fa)
    pred = km.predict(fe)
    if n == 0:
        return pred  # cluster ids: the caller matches them to classes
    names = np.empty(k, np.int64)
    member = km.labels_[:n]
    for c in range(k):
        votes = labels[:n][member == c]
        if len(votes):
            names[c] = np.bincount(votes).argmax()
        else:
            nearest = np.argmin(((fa[:n] - km.cluster_centers_[c]) ** 2).sum(1))
            names[c] = labels[nearest]
    return names[pred]


def own_data(aux: np.ndarray, aux_labels: np.ndarray, evaluation: np.ndarray,
             eval_labels: np.ndarray, n: int, classes: int, seed: int = 0) -> dict[str, float]:
    """Accuracy on the evaluation half of each own-data baseline with the first `n` aux labels,
    with `best` (the strongest) and `chance`. Images are arrays N x C x H x W (or N x D)."""
    fa, fe = _features(aux, evaluation, seed)
    out: dict[str, float] = {}
    cv = _cluster_vote(fa, fe, aux_labels, n, classes, seed)
    out["cluster-vote"] = (scoring.hungarian_accuracy(cv, eval_labels) if n == 0
                           else scoring.accuracy(cv, eval_labels))
    if n > 0 and len(np.unique(aux_labels[:n])) > 1:
        sup = LogisticRegression(max_iter=1000).fit(fa[:n], aux_labels[:n])
        out["supervised"] = scoring.accuracy(sup.predict(fe), eval_labels)
        y = np.full(len(fa), -1)
        y[:n] = aux_labels[:n]
        # an image no label reaches through the graph has no distribution (0 / 0): scikit-learn
        # warns and the prediction is class 0, which is what such a baseline knows of it
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=100).fit(fa, y)
            out["label-spreading"] = scoring.accuracy(spread.predict(fe), eval_labels)
    best = max(out, key=out.get)
    return {**out, "best": out[best], "best_name": best,
            "chance": scoring.chance_accuracy(eval_labels)}
