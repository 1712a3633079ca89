"""Baselines of docs/results.md on the SAME cached features and split as multiclip.

Reads a multiclip cache directly (manifest.json + shard-*.safetensors; row ids in each shard's
`multiclip` metadata), L2-normalises each feature and concatenates them as in
/work/shared/reference/peer-numbers.md, trains one-vs-rest logistic regression (C=1, C=100) and a
PyTorch MLP (Linear -> ReLU -> Linear, AdamW 1e-3, 100 epochs), tunes per-label thresholds on the
split's validation ids two ways (the original's greedy 0.01..0.80 grid, and an exact search over
every gap between validation scores followed by micro-F1 coordinate ascent) and scores the test
rows (test_labels.csv): mAP, micro-F1, macro-F1. Every sample gets at least one label (the one
closest to its threshold), as `multiclip evaluate` does by default; `--no-at-least-one` turns it off.

`--folds-from ENSEMBLE.json` also trains each model as a k-fold ensemble on the SAME folds as a
multiclip k-fold ensemble (its sidecar's `fold_ids`): one model per fold trained on the other
folds, thresholds tuned on the out-of-fold probabilities, test probabilities averaged over the
folds (rows "... k-fold"; their val_* columns are out-of-fold). `--models lr1,lr100,mlp` picks the
models (the MLP needs torch).

    PY=$(scripts/python-env.sh)
    $PY scripts/baselines.py --data data/openclipart-full --train-cache cache/oc-train \
        --test-cache cache/oc-test --split checkpoints/oc/split.json --out checkpoints/oc/baselines.tsv
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier

SEED = 3407


def load_cache(folder):
    """{output name: float32 [rows, D]} and the row ids, in cache order."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    names = [o["name"] for o in manifest["outputs"] if len(o["shape"]) == 1]
    parts, ids = {n: [] for n in names}, []
    for shard in manifest["shards"]:
        with safe_open(str(Path(folder) / shard["file"]), "np") as f:
            ids += json.loads(f.metadata()["multiclip"])["ids"]
            for n in names:
                parts[n].append(f.get_tensor(n).astype(np.float32))
    return {n: np.concatenate(v) for n, v in parts.items()}, ids


def read_labels(path, vocab):
    """{image id: multi-hot row} from a csv with ImageID and space-separated Labels columns."""
    index = {name: k for k, name in enumerate(vocab)}
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            y = np.zeros(len(vocab), dtype=np.float32)
            for name in row["Labels"].split():
                y[index[name]] = 1
            out[row["ImageID"]] = y
    return out


def features(cache, ids, wanted, rows):
    pos = {i: r for r, i in enumerate(ids)}
    missing = [i for i in rows if i not in pos]
    if missing:
        sys.exit(f"{len(missing)} ids missing from the cache, e.g. {missing[:3]}")
    take = np.array([pos[i] for i in rows])
    blocks = []
    for name in wanted:
        x = cache[name][take]
        blocks.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return np.concatenate(blocks, axis=1)


# ---- thresholds and metrics -------------------------------------------------------------------


def predict(scores, thresholds, at_least_one):
    pred = scores >= thresholds
    if at_least_one:
        empty = ~pred.any(axis=1)
        closest = np.argmin(np.abs(scores - thresholds), axis=1)
        pred[empty, closest[empty]] = True
    return pred


def f1s(y, pred):
    tp = (pred & (y > 0)).sum(0)
    fp = (pred & (y == 0)).sum(0)
    fn = (~pred & (y > 0)).sum(0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    denom = 2 * tp + fp + fn
    per = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return micro, per.mean()


def micro_counts(y, pred):
    tp = (pred & (y > 0)).sum(0)
    fp = (pred & (y == 0)).sum(0)
    fn = (~pred & (y > 0)).sum(0)
    return tp, fp, fn


def coordinate_ascent(y, scores, thresholds, candidates, passes):
    """Per label in turn, the candidate threshold that maximises micro-F1 (others fixed)."""
    t = thresholds.copy()
    for _ in range(passes):
        tp, fp, fn = micro_counts(y, scores >= t)
        for k in range(y.shape[1]):
            rest_tp, rest_fp, rest_fn = tp.sum() - tp[k], fp.sum() - fp[k], fn.sum() - fn[k]
            cands = candidates(k)
            p = scores[:, k][:, None] >= cands[None, :]
            pos = (y[:, k] > 0)[:, None]
            ktp, kfp = (p & pos).sum(0), (p & ~pos).sum(0)
            kfn = pos.sum() - ktp
            f = 2 * (rest_tp + ktp) / np.maximum(2 * (rest_tp + ktp) + rest_fp + kfp + rest_fn + kfn, 1)
            best = int(np.argmax(f))
            t[k] = cands[best]
            tp[k], fp[k], fn[k] = ktp[best], kfp[best], kfn[best]
    return t


def greedy_thresholds(y, scores):
    """The original: one greedy pass over the labels, thresholds in 0.01..0.80, micro-F1."""
    grid = np.round(np.arange(0.01, 0.805, 0.01), 2)
    return coordinate_ascent(y, scores, np.full(y.shape[1], 0.5), lambda k: grid, passes=1)


def exact_thresholds(y, scores):
    """Every gap between distinct validation scores: best per-label F1, then micro-F1 ascent."""
    cand = []
    for k in range(y.shape[1]):
        s = np.unique(scores[:, k])
        mids = (s[1:] + s[:-1]) / 2 if len(s) > 1 else np.array([0.5])
        cand.append(np.concatenate([mids, [0.5]]))
    t = np.full(y.shape[1], 0.5)
    for k in range(y.shape[1]):
        if y[:, k].sum() == 0:
            continue
        p = scores[:, k][:, None] >= cand[k][None, :]
        pos = (y[:, k] > 0)[:, None]
        tp, fp = (p & pos).sum(0), (p & ~pos).sum(0)
        fn = pos.sum() - tp
        t[k] = cand[k][int(np.argmax(2 * tp / np.maximum(2 * tp + fp + fn, 1)))]
    return coordinate_ascent(y, scores, t, lambda k: cand[k], passes=3)


def mean_ap(y, scores):
    keep = y.sum(0) > 0
    return float(np.mean([average_precision_score(y[:, k], scores[:, k]) for k in np.where(keep)[0]]))


# ---- models -----------------------------------------------------------------------------------


def logistic(c):
    def fit(xtr, ytr, xva, xte):
        model = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000), n_jobs=1)
        model.fit(xtr, ytr)
        return model.predict_proba(xva), model.predict_proba(xte)

    return fit


def mlp(epochs=100, lr=1e-3, hidden=768, batch=256):
    def fit(xtr, ytr, xva, xte):
        import torch

        torch.manual_seed(SEED)
        torch.set_num_threads(1)  # a tiny MLP: one thread avoids spin-waiting on a busy machine
        net = torch.nn.Sequential(
            torch.nn.Linear(xtr.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, ytr.shape[1])
        )
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        loss = torch.nn.BCEWithLogitsLoss()
        x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
        gen = torch.Generator().manual_seed(SEED)
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(len(x), generator=gen).split(batch):
                opt.zero_grad()
                loss(net(x[idx]), y[idx]).backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            return tuple(torch.sigmoid(net(torch.from_numpy(v))).numpy() for v in (xva, xte))

    return fit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/openclipart-full")
    ap.add_argument("--train-cache", default="cache/oc-train")
    ap.add_argument("--test-cache", default="cache/oc-test")
    ap.add_argument("--split", default="checkpoints/oc/split.json")
    ap.add_argument("--out", default="checkpoints/oc/baselines.tsv")
    ap.add_argument("--no-at-least-one", action="store_true")
    ap.add_argument("--unimodal", action="store_true", help="also logistic regression C=100 on text / image only")
    ap.add_argument("--models", default="lr1,lr100,mlp", help="comma-separated: lr1, lr100, mlp")
    ap.add_argument("--folds-from", help="a multiclip k-fold ensemble sidecar: also k-fold ensembles on its folds")
    args = ap.parse_args()
    at_least_one = not args.no_at_least_one

    split = json.loads(Path(args.split).read_text())
    vocab = json.loads((Path(args.split).parent / "labels.json").read_text())["labels"]
    train_labels = read_labels(Path(args.data) / "train.csv", vocab)
    test_labels = read_labels(Path(args.data) / "test_labels.csv", vocab)
    train_cache, train_ids = load_cache(args.train_cache)
    test_cache, test_ids = load_cache(args.test_cache)
    tr = [i for i in split["train"] if i in set(train_ids)]
    va = [i for i in split["val"] if i in set(train_ids)]
    te = [i for i in test_ids if i in test_labels]
    ytr = np.stack([train_labels[i] for i in tr])
    yva = np.stack([train_labels[i] for i in va])
    yte = np.stack([test_labels[i] for i in te])
    print(f"rows: {len(tr)} train / {len(va)} validation / {len(te)} test; {len(vocab)} labels", flush=True)

    feature_sets = {
        "image + text": ["image", "text"],
        "image + patch mean + text": ["image", "image_patch_mean", "text"],
        "text": ["text"],
        "image + patch mean": ["image", "image_patch_mean"],
    }
    all_models = {
        "lr1": ("logistic regression C=1", logistic(1.0)),
        "lr100": ("logistic regression C=100", logistic(100.0)),
        "mlp": ("PyTorch MLP (AdamW 1e-3, 100 epochs)", mlp()),
    }
    models = dict(all_models[key] for key in args.models.split(","))
    runs = [(m, f) for f in ["image + text", "image + patch mean + text"] for m in models]
    if args.unimodal:
        runs += [("logistic regression C=100", "text"), ("logistic regression C=100", "image + patch mean")]
    # A cache without the image outputs (a text-only backbone): every model on the text.
    runs = [(m, f) for m, f in runs if all(n in train_cache for n in feature_sets[f])] or [
        (m, "text") for m in models
    ]
    folds = None
    if args.folds_from:
        folds = json.loads(Path(args.folds_from).read_text())["fold_ids"]
        print(f"{len(folds)} folds of {sum(map(len, folds))} rows from {args.folds_from}", flush=True)

    def measure(model_name, feat_name, y_tune, p_tune, pte, start):
        """One row: thresholds tuned on (y_tune, p_tune) three ways, scored on the test rows."""
        result = {"model": model_name, "features": feat_name, "val_map": mean_ap(y_tune, p_tune),
                  "test_map": mean_ap(yte, pte)}
        for tune_name, tune in [("0.5", None), ("greedy", greedy_thresholds), ("exact", exact_thresholds)]:
            t = np.full(len(vocab), 0.5) if tune is None else tune(y_tune, p_tune)
            result[f"val_micro_{tune_name}"] = f1s(y_tune, predict(p_tune, t, at_least_one))[0]
            mi, ma = f1s(yte, predict(pte, t, at_least_one))
            result[f"test_micro_{tune_name}"], result[f"test_macro_{tune_name}"] = mi, ma
        result["seconds"] = round(time.time() - start, 1)
        rows.append(result)
        print("\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in result.values()), flush=True)

    rows = []
    for model_name, feat_name in runs:
        start = time.time()
        names = feature_sets[feat_name]
        xtr, xva, xte = (features(c, i, names, r) for c, i, r in
                         [(train_cache, train_ids, tr), (train_cache, train_ids, va), (test_cache, test_ids, te)])
        pva, pte = models[model_name](xtr, ytr, xva, xte)
        measure(model_name, feat_name, yva, pva, pte, start)
        if folds is None:
            continue
        # The same model as a k-fold ensemble on multiclip's folds.
        start = time.time()
        folded = [i for fold in folds for i in fold]
        xall = features(train_cache, train_ids, names, folded)
        yall = np.stack([train_labels[i] for i in folded])
        which = np.concatenate([np.full(len(fold), k) for k, fold in enumerate(folds)])
        oof = np.zeros_like(yall)
        pte_sum = np.zeros((len(te), len(vocab)), dtype=np.float64)
        for k in range(len(folds)):
            out, inside = which == k, which != k
            p_out, p_test = models[model_name](xall[inside], yall[inside], xall[out], xte)
            oof[out] = p_out
            pte_sum += p_test
        measure(f"{model_name} {len(folds)}-fold", feat_name, yall, oof, pte_sum / len(folds), start)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
