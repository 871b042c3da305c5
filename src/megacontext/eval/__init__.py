"""Evaluation (spec §6): context policies at equal budget, loss@H, passkey, timing, report.

The policies themselves live in :mod:`megacontext.focus.policies`; evaluation runs them on
the same windows and reports them.

- :mod:`.evaluate`  data, windows, loss@H, the driver -> eval.json
- :mod:`.passkey`   passkey retrieval grid (history length x depth), exact match
- :mod:`.timing`    traced runtime session; base forward vs refocus vs GistNet latency
- :mod:`.results`   eval.json schema, ΔNLL, gap closed, printed table, acceptance check
- :mod:`.report`    report.md with PNG plots for a run folder
"""
