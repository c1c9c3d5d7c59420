"""Analyse per-item choice log-likelihoods of a t sweep: raw vs label-free calibrated accuracy, AUC, label-free rules for t.

Input: one or more ``logliks*.json`` written by ``run_gemma.py`` / ``run_demo.py``:
``{"choices", "source": {"lang", "labels", "loglik": n x k}, "targets": {lang: {"labels", "points": {t: n x k}}}}``
(the source items are the same items as the target items, in the source language: parallel inputs).

Nothing here reads a target label except to *score* a choice made without it.

Calibration (label-free): per evaluated set (one language, one t), k additive offsets ``b`` such that the class
counts of ``argmax(loglik + b)`` match ``target * n``:

- ``uniform``: target = 1/k each;
- ``source``: target = the task adapter's predicted class shares on the source-language versions of the
  same inputs (what the task adapter "believes" the prior is, measured where it was trained).

Rules that choose t per target language without target labels (all read only the log-likelihoods):

- ``least-shift`` (raw predictions): the t whose predicted class shares are closest (total variation) to
  the source reference shares;
- ``max-confidence`` (calibrated predictions): the t with the highest mean max-probability after
  calibration (the normalised choice probabilities of ``loglik + b``), i.e. the most decisive model once its
  prior is corrected;
- ``source-agreement`` (calibrated predictions): the t whose calibrated predictions on the target inputs
  agree most often with the task adapter's predictions on the parallel source inputs.

Bootstrap: items resampled with replacement (B times, within each language; pooled = the per-language
resamples concatenated), calibration and the rules' choices recomputed on every resample; 95% percentile
intervals. Differences are paired (same resample for both arms).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:  # the package's label-free calibration (issue 10, part 1), once it lands
    import torch

    from adamergex_peft.calibration import calibrated_predictions as _pkg_calibrated_predictions
    from adamergex_peft.calibration import prior_offsets as _pkg_prior_offsets

    HAVE_PKG = True
except ImportError:  # private fallback until then
    HAVE_PKG = False

RULES = {
    "least-shift": "raw",
    "max-confidence": "cal",
    "source-agreement": "cal",
}


def _counts(target: np.ndarray, n: int) -> np.ndarray:
    """Integer class counts closest to target * n (largest remainders), summing to n."""
    raw = target * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    return counts


def prior_offsets_fallback(loglik: np.ndarray, target: np.ndarray | None = None, iters: int = 25) -> np.ndarray:
    """Offsets b (k,) so that argmax(loglik + b) has the class counts closest to target * n.

    k = 2: exact in one step (a threshold halfway between two sorted margins). k > 2: cyclic
    coordinate updates (each sets one class's offset so that, the others fixed, exactly its target
    count of items prefers it); stops when the counts match (not proven to converge; the package's
    ``prior_offsets`` is the documented method).
    """
    n, k = loglik.shape
    target = np.full(k, 1.0 / k) if target is None else np.asarray(target, dtype=float)
    want = _counts(target, n)
    b = np.zeros(k)
    for _ in range(iters):
        for c in range(1 if k == 2 else 0, k):
            other = np.delete(loglik + b, c, axis=1).max(axis=1)
            need = other - loglik[:, c]  # item i prefers c iff b_c > need_i
            s = np.sort(need)
            m = want[c]
            if m == 0:
                b[c] = s[0] - 1.0
            elif m == n:
                b[c] = s[-1] + 1.0
            else:
                b[c] = 0.5 * (s[m - 1] + s[m])
        if k == 2 or np.array_equal(np.bincount((loglik + b).argmax(1), minlength=k), want):
            break
    return b


def assignment_predictions(loglik: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Exact label-free calibration for any k: the predictions with class counts ``_counts(target, n)`` that
    maximise the summed log-likelihood (a transportation problem, solved as an assignment of the n items to n
    class slots). Any offsets b whose argmax meets the counts give this assignment up to ties."""
    from scipy.optimize import linear_sum_assignment

    n, k = loglik.shape
    target = np.full(k, 1.0 / k) if target is None else np.asarray(target, dtype=float)
    slots = np.repeat(np.arange(k), _counts(target, n))
    rows, cols = linear_sum_assignment(-loglik[:, slots])
    pred = np.empty(n, dtype=int)
    pred[rows] = slots[cols]
    return pred


def prior_offsets(loglik: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    if HAVE_PKG:
        t = None if target is None else torch.as_tensor(target, dtype=torch.float64)
        return np.asarray(_pkg_prior_offsets(torch.as_tensor(loglik, dtype=torch.float64), t), dtype=float)
    return prior_offsets_fallback(loglik, target)


def calibrated_predictions(loglik: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    if HAVE_PKG:
        t = None if target is None else torch.as_tensor(target, dtype=torch.float64)
        return _pkg_calibrated_predictions(torch.as_tensor(loglik, dtype=torch.float64), t).numpy()
    if loglik.shape[1] == 2:
        return (loglik + prior_offsets_fallback(loglik, target)).argmax(1)
    return assignment_predictions(loglik, target)


def auc(margin: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``margin`` for label 1 (Mann-Whitney, ties counted half)."""
    pos, neg = margin[labels == 1], margin[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = 0.5 * (i + j) + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def shares(pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(pred, minlength=k) / len(pred)


def point_stats(L: np.ndarray, y: np.ndarray, src_pred: np.ndarray, ref: np.ndarray) -> dict:
    """Every per-point quantity; only acc* and auc read ``y``."""
    n, k = L.shape
    raw = L.argmax(1)
    b = prior_offsets(L, ref)  # k > 2 without the package: approximate, used only for cal_confidence
    cal = calibrated_predictions(L, ref)
    cal_u = calibrated_predictions(L, None)
    z = L + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = {
        "acc": float((raw == y).mean()),
        "acc_cal_source": float((cal == y).mean()),
        "acc_cal_uniform": float((cal_u == y).mean()),
        "shares": shares(raw, k).tolist(),
        "tv_to_ref": float(0.5 * np.abs(shares(raw, k) - ref).sum()),
        "cal_confidence": float(p.max(1).mean()),
        "agreement_cal": float((cal == src_pred).mean()),
        "agreement_raw": float((raw == src_pred).mean()),
    }
    if k == 2:
        out["auc"] = auc(L[:, 1] - L[:, 0], y)
    return out


def pick(rule: str, per_t: dict[str, dict]) -> str:
    ts = sorted(per_t, key=float)
    if rule == "least-shift":
        return min(ts, key=lambda t: (per_t[t]["tv_to_ref"], float(t)))
    if rule == "max-confidence":
        return max(ts, key=lambda t: (per_t[t]["cal_confidence"], -float(t)))
    if rule == "source-agreement":
        return max(ts, key=lambda t: (per_t[t]["agreement_cal"], -float(t)))
    raise ValueError(rule)


def evaluate(data: dict, idx: dict[str, np.ndarray] | None = None) -> dict:
    """All stats per language and t (on the resample ``idx`` per language), plus pooled accuracies and rule picks."""
    src = data["source"]
    k = len(np.asarray(src["loglik"][0]))
    res = {"langs": {}, "pooled": {}}
    pooled_correct: dict[str, dict[str, list]] = {}
    for lang, entry in data["targets"].items():
        y_all = np.asarray(entry["labels"])
        ii = np.arange(len(y_all)) if idx is None else idx[lang]
        y = y_all[ii]
        src_L = np.asarray(src["loglik"])[ii]
        src_pred = src_L.argmax(1)
        ref = shares(src_pred, k)
        per_t = {}
        for t, L in entry["points"].items():
            per_t[t] = point_stats(np.asarray(L)[ii], y, src_pred, ref)
            for m in ("acc", "acc_cal_source", "acc_cal_uniform"):
                pooled_correct.setdefault(t, {}).setdefault(m, []).append((per_t[t][m], len(y)))
        picks = {rule: pick(rule, per_t) for rule in RULES}
        res["langs"][lang] = {"per_t": per_t, "picks": picks}
    ts = sorted(pooled_correct, key=float)
    for t in ts:
        res["pooled"][t] = {m: sum(a * n for a, n in v) / sum(n for _, n in v) for m, v in pooled_correct[t].items()}
    # Pooled accuracy when each language uses its own rule-chosen t (raw or calibrated, as the rule deploys).
    for rule, kind in RULES.items():
        metric = "acc" if kind == "raw" else "acc_cal_source"
        tot = n_tot = 0
        for lang, r in res["langs"].items():
            n = len(data["targets"][lang]["labels"]) if idx is None else len(idx[lang])
            tot += r["per_t"][r["picks"][rule]][metric] * n
            n_tot += n
        res["pooled"][f"rule:{rule}"] = {metric: tot / n_tot}
    return res


def bootstrap(data: dict, B: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(B):
        idx = {lang: rng.integers(0, len(e["labels"]), len(e["labels"])) for lang, e in data["targets"].items()}
        reps.append(evaluate(data, idx))
    return reps


def ci(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x == x])
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def dci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def report(name: str, data: dict, B: int, seed: int) -> tuple[str, dict]:
    full = evaluate(data)
    reps = bootstrap(data, B, seed)
    ts = sorted(full["pooled"], key=lambda s: float(s) if not s.startswith("rule:") else 1e9)
    ts = [t for t in ts if not t.startswith("rule:")]
    t0 = ts[0]
    binary = (
        len(data["choices"]) == 2 if "choices" in data else "auc" in next(iter(full["langs"].values()))["per_t"][t0]
    )
    lines = [f"### {name}", ""]
    src = data["source"]
    src_acc = float((np.asarray(src["loglik"]).argmax(1) == np.asarray(src["labels"])).mean())
    k = np.asarray(src["loglik"]).shape[1]
    lines.append(
        f"Source language ({src['lang']}), task adapter: accuracy {pct(src_acc)}; predicted class shares "
        f"{[round(float(x), 3) for x in shares(np.asarray(src['loglik']).argmax(1), k)]} (the `source` reference). "
        f"{B} bootstrap resamples; brackets: 95% CI of the difference to t={t0} (paired)."
    )
    lines.append("")
    summary = {"name": name, "langs": {}, "pooled": {}, "rules": {}}
    metrics = [
        ("acc", "acc"),
        ("acc_cal_source", "cal. acc (source shares)"),
        ("acc_cal_uniform", "cal. acc (uniform)"),
    ]
    for lang, r in full["langs"].items():
        lines += [f"**{lang}** (n={len(data['targets'][lang]['labels'])})", ""]
        if "oracle_loglik" in data["targets"][lang]:
            o = np.asarray(data["targets"][lang]["oracle_loglik"])
            y = np.asarray(data["targets"][lang]["labels"])
            lines += [
                f"Oracle (task adapter trained on {lang} labels): accuracy {pct(float((o.argmax(1) == y).mean()))}, "
                f"calibrated (uniform) {pct(float((calibrated_predictions(o, None) == y).mean()))}.",
                "",
            ]
        head = "| t | " + " | ".join(f"{h} | vs t={t0}" for _, h in metrics)
        head += " | AUC |" if binary else " |"
        head += " pred. shares | TV to ref | cal. confidence | agreement (cal) |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        summary["langs"][lang] = {}
        for t in ts:
            s = r["per_t"][t]
            cells = [t]
            for m, _h in metrics:
                d = ci(rep["langs"][lang]["per_t"][t][m] - rep["langs"][lang]["per_t"][t0][m] for rep in reps)
                cells += [pct(s[m]), "" if t == t0 else dci(d)]
            if binary:
                a_ci = ci(rep["langs"][lang]["per_t"][t]["auc"] for rep in reps)
                cells.append(f"{s['auc']:.3f} [{a_ci[0]:.3f}, {a_ci[1]:.3f}]")
            cells += [
                "/".join(f"{x:.2f}" for x in s["shares"]),
                f"{s['tv_to_ref']:.3f}",
                f"{s['cal_confidence']:.3f}",
                pct(s["agreement_cal"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
            summary["langs"][lang][t] = s
        lines.append("")
    # Pooled.
    lines += [f"**pooled** over {', '.join(full['langs'])} (each language calibrated on its own items)", ""]
    head = "| t | " + " | ".join(f"{h} | vs t={t0}" for _, h in metrics)
    head += " | calibration gain (source shares) at this t |" + (" mean AUC |" if binary else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for t in ts:
        cells = [t]
        for m, _h in metrics:
            d = ci(rep["pooled"][t][m] - rep["pooled"][t0][m] for rep in reps)
            cells += [pct(full["pooled"][t][m]), "" if t == t0 else dci(d)]
        gain = full["pooled"][t]["acc_cal_source"] - full["pooled"][t]["acc"]
        g_ci = ci(rep["pooled"][t]["acc_cal_source"] - rep["pooled"][t]["acc"] for rep in reps)
        cells.append(f"{100 * gain:+.1f} {dci(g_ci)}")
        if binary:
            cells.append(f"{np.mean([r['per_t'][t]['auc'] for r in full['langs'].values()]):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
        summary["pooled"][t] = full["pooled"][t]
    lines.append("")
    # Rules.
    lines += [
        "**Label-free choice of t** (per language; deployed with raw predictions for least-shift, calibrated "
        "(source shares) otherwise). Hindsight best = the t with the best accuracy of the same kind, chosen with "
        "the labels. 'vs best' and 'vs t=0' are paired bootstrap CIs in which the rule re-picks t on every resample.",
        "",
        "| rule | deploys | "
        + " | ".join(f"{lang}: t picked (best) | {lang}: acc (best)" for lang in full["langs"])
        + " | pooled acc | vs hindsight best (pooled) | vs t=0 same kind (pooled) |",
        "|" + "---|" * (3 + 2 * len(full["langs"]) + 2),
    ]
    for rule, kind in RULES.items():
        metric = "acc" if kind == "raw" else "acc_cal_source"
        cells = [rule, "raw" if kind == "raw" else "calibrated"]
        best_pooled_full = 0.0
        n_tot = 0
        rule_sum = {}
        for lang, r in full["langs"].items():
            t_pick = r["picks"][rule]
            t_best = max(ts, key=lambda t: (r["per_t"][t][metric], -float(t)))
            n = len(data["targets"][lang]["labels"])
            best_pooled_full += r["per_t"][t_best][metric] * n
            n_tot += n
            cells += [f"{t_pick} ({t_best})", f"{pct(r['per_t'][t_pick][metric])} ({pct(r['per_t'][t_best][metric])})"]
            rule_sum[lang] = {
                "pick": t_pick,
                "best": t_best,
                "acc": r["per_t"][t_pick][metric],
                "best_acc": r["per_t"][t_best][metric],
            }
        pooled_rule = full["pooled"][f"rule:{rule}"][metric]

        def best_of(rep, metric=metric):
            tot = nn = 0
            for lang, rr in rep["langs"].items():
                n = len(data["targets"][lang]["labels"])
                tot += max(rr["per_t"][t][metric] for t in ts) * n
                nn += n
            return tot / nn

        d_best = ci(rep["pooled"][f"rule:{rule}"][metric] - best_of(rep) for rep in reps)
        d_t0 = ci(rep["pooled"][f"rule:{rule}"][metric] - rep["pooled"][t0][metric] for rep in reps)
        cells += [
            pct(pooled_rule),
            f"{pct(pooled_rule - best_pooled_full / n_tot)} {dci(d_best)}",
            f"{pct(pooled_rule - full['pooled'][t0][metric])} {dci(d_t0)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        summary["rules"][rule] = {
            "deploys": kind,
            "langs": rule_sum,
            "pooled_acc": pooled_rule,
            "pooled_best_acc": best_pooled_full / n_tot,
            "ci_vs_best": d_best,
            "ci_vs_t0": d_t0,
        }
    lines.append("")
    return "\n".join(lines), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="logliks JSON files")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the markdown here (and a .json summary beside it)")
    args = ap.parse_args(argv)
    texts, summaries = [], []
    note = "package `adamergex_peft.calibration`" if HAVE_PKG else "the private fallback in analyze.py"
    for path in args.inputs:
        data = json.loads(Path(path).read_text())
        name = data.get("testbed", Path(path).stem)
        # Only the t values every language has (a run cut short, or a merge refused at some t).
        data["targets"] = {lang: e for lang, e in data["targets"].items() if e["points"]}
        common = set.intersection(*(set(e["points"]) for e in data["targets"].values()))
        for e in data["targets"].values():
            e["points"] = {t: v for t, v in e["points"].items() if t in common and v is not None}
        text, summary = report(name, data, args.bootstrap, args.seed)
        texts.append(text)
        summaries.append(summary)
    text = f"_Calibration by {note}._\n\n" + "\n".join(texts)
    if args.output:
        out = Path(args.output)
        out.write_text(text + "\n", encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(summaries, indent=1) + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
