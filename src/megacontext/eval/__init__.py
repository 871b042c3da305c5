"""Evaluation (spec §6): context policies at equal budget, loss@H, passkey, timing, report.

- :mod:`.policies`  what each policy feeds the base (reference, recency, sinks,
  uniform_gists, random_focus, megacontext)
- :mod:`.evaluate`  modules (+ ablations), data, windows, loss@H, the driver -> eval.json
- :mod:`.passkey`   passkey retrieval grid (history length x depth), exact match
- :mod:`.timing`    traced runtime session; base forward vs refocus vs GistNet latency
- :mod:`.results`   eval.json schema, ΔNLL, gap closed, printed table, acceptance check
- :mod:`.report`    report.md with PNG plots for a run folder
"""
