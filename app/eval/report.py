"""What an eval found, as one value (`Report`), rendered as text for a person or as JSON for a script.

Figures (see `app.eval.scoring` for the exact definitions): each configuration's pooled WER with its counts,
the candidate's WER minus the baseline's (in points of percentage), and the token agreement of the candidate with
the baseline: pooled (aligned equal positions over the longer sequence's length, summed over files), the mean of
the per-file figures, the share of files whose tokens are identical, and the mean index of the first differing
token over the files that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from statistics import mean
from typing import Any

from app.eval.corpus import Sample
from app.eval.scoring import TokenAgreement, WordErrors, pooled, token_agreement, word_errors
from app.eval.transcribe import Hypothesis


@dataclass(frozen=True)
class Run:
    """One configuration's hypotheses and their word errors, file by file."""

    label: str
    hypotheses: list[Hypothesis]
    errors: list[WordErrors]

    @classmethod
    def score(cls, label: str, samples: list[Sample], hypotheses: list[Hypothesis]) -> Run:
        return cls(
            label, hypotheses, [word_errors(s.reference, h.text) for s, h in zip(samples, hypotheses, strict=True)]
        )

    @property
    def total(self) -> WordErrors:
        return pooled(self.errors)


@dataclass(frozen=True)
class Report:
    samples: list[Sample]
    baseline: Run
    candidate: Run | None = None

    @cached_property
    def agreements(self) -> list[TokenAgreement]:
        if self.candidate is None:
            return []
        pairs = zip(self.baseline.hypotheses, self.candidate.hypotheses, strict=True)
        return [token_agreement(a.token_ids, b.token_ids) for a, b in pairs]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"files": len(self.samples), "baseline": _run_summary(self.baseline)}
        if self.candidate is not None:
            out["candidate"] = _run_summary(self.candidate)
            out["wer_difference"] = _difference(self.baseline.total, self.candidate.total)
            out["agreement"] = _agreement_summary(self.agreements)
        out["per_file"] = [self._file(i) for i in range(len(self.samples))]
        return out

    def _file(self, i: int) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.samples[i].id, "reference": self.samples[i].reference}
        row["baseline"] = _hypothesis(self.baseline, i)
        if self.candidate is not None:
            row["candidate"] = _hypothesis(self.candidate, i)
            a = self.agreements[i]
            row["agreement"] = {"value": a.agreement, "hits": a.hits, "length": a.length}
            row["agreement"]["first_divergence"] = a.first_divergence
        return row


def _hypothesis(run: Run, i: int) -> dict[str, Any]:
    h, e = run.hypotheses[i], run.errors[i]
    return {"text": h.text, "token_ids": h.token_ids, "wer": e.wer, **_counts(e)}


def _counts(e: WordErrors) -> dict[str, int]:
    return {
        "reference_words": e.reference_words,
        "substitutions": e.substitutions,
        "deletions": e.deletions,
        "insertions": e.insertions,
        "hits": e.hits,
    }


def _run_summary(run: Run) -> dict[str, Any]:
    return {"label": run.label, "wer": run.total.wer, **_counts(run.total)}


def _difference(a: WordErrors, b: WordErrors) -> float | None:
    """The candidate's WER minus the baseline's, a fraction like the WERs (None if either has none)."""
    return None if a.wer is None or b.wer is None else b.wer - a.wer


def _agreement_summary(agreements: list[TokenAgreement]) -> dict[str, Any]:
    length = sum(a.length for a in agreements)
    divergences = [a.first_divergence for a in agreements if a.first_divergence is not None]
    return {
        "pooled": sum(a.hits for a in agreements) / length if length else 1.0,
        "mean_per_file": mean(a.agreement for a in agreements),
        "identical_files": sum(a.identical for a in agreements),
        "identical_share": sum(a.identical for a in agreements) / len(agreements),
        "mean_first_divergence": mean(divergences) if divergences else None,
    }


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False)


def render_text(report: Report) -> str:
    d = report.as_dict()
    words = d["baseline"]["reference_words"]
    lines = [f"files: {d['files']}, reference words (normalised): {words}"]
    lines += [_wer_line(d[key]) for key in ("baseline", "candidate") if key in d]
    if "candidate" in d:
        diff = d["wer_difference"]
        lines.append(
            "WER difference (candidate - baseline): " + ("n/a" if diff is None else f"{100 * diff:+.2f} points")
        )
        lines += _agreement_lines(d["agreement"], d["files"])
    return "\n".join(lines)


def _wer_line(s: dict[str, Any]) -> str:
    wer = "n/a" if s["wer"] is None else f"{100 * s['wer']:.2f} %"
    counts = f"S {s['substitutions']}, D {s['deletions']}, I {s['insertions']} of N {s['reference_words']}"
    return f"WER {wer:>8}  ({counts})  {s['label']}"


def _agreement_lines(a: dict[str, Any], files: int) -> list[str]:
    first = a["mean_first_divergence"]
    diverging = files - a["identical_files"]
    return [
        f"token agreement: {a['pooled']:.4f} pooled, {a['mean_per_file']:.4f} mean per file "
        "(positions equal under a Levenshtein alignment of the token ids / the longer sequence's length)",
        f"identical token sequences: {a['identical_files']} of {files} files ({100 * a['identical_share']:.1f} %)",
        "first divergence: " + ("none" if first is None else f"token {first:.1f} on average over {diverging} file(s)"),
    ]
