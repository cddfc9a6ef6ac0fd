"""Parameter importances of a sweep: Optuna's fANOVA evaluator over the completed trials, shown next to the
parallel coordinates and written to ``importance.json``.

fANOVA fits a random forest from the parameters to the objective and splits the objective's variance between
them; it needs at least two completed trials (and a parameter that varies). Parameters Optuna did not sample
(weighted categoricals, normal/beta draws) are not in its search space and get no importance.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

MIN_TRIALS = 2


def param_importances(study: optuna.Study, seed: int = 0) -> tuple[dict[str, float] | None, str]:
    """``({param: importance}, note)``; ``(None, why)`` when there is not enough to go on."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < MIN_TRIALS:
        return None, f"parameter importances need at least {MIN_TRIALS} completed trials ({len(done)} so far)"
    if len({t.value for t in done}) < 2:
        return None, "every completed trial has the same objective: no importance can be told apart"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
            )
    except Exception as e:  # e.g. no parameter common to every completed trial
        return None, f"parameter importances not computed: {' '.join(str(e).split())[:200]}"
    if not imp:
        return None, "no sampled parameter varies across the completed trials"
    return {k: float(v) for k, v in imp.items()}, f"fANOVA over {len(done)} completed trials"


def importance_html(importances: dict[str, float] | None, note: str) -> str:
    """A plotly bar chart (plotly.js loaded by the page already) or the note saying why there is none."""
    if not importances:
        from cxrlab.report import html as rh

        return rh.render("sweep_note.html", note=note)
    import plotly.graph_objects as go

    names = list(importances)[::-1]  # largest on top
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(
        title={"text": f"parameter importance<br><sup>{note}</sup>"},
        xaxis={"title": {"text": "share of objective variance"}},
        margin={"l": 140, "r": 30, "t": 90, "b": 50},
        height=max(300, 60 * len(names) + 140),
    )
    return str(fig.to_html(full_html=False, include_plotlyjs=False))


def page(parcoords: Any, importances: dict[str, float] | None, note: str | None, title: str) -> str:
    """One self-contained page: the parallel coordinates (plotly.js inlined) beside the importance chart, or the
    note saying why there is none; ``note=None``: no importance panel at all."""
    from cxrlab.report import html as rh

    return rh.render(
        "sweep.html",
        title=title,
        # plotly's own HTML (chart divs and plotly.js): library output, inserted as it is
        parcoords=rh.trusted(parcoords.to_html(full_html=False, include_plotlyjs=True)),
        importance=rh.trusted(importance_html(importances, note)) if note is not None else None,
    )
