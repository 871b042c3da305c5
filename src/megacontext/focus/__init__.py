"""The focus room: every context policy behind one interface, and the on-policy loop.

Training validation, evaluation and the runtime session all come here for what the base
reads before the horizon; none rebuilds a policy by hand.

- :mod:`~megacontext.focus.source`   — entry sources (one window's embeddings + gists; a tree)
- :mod:`~megacontext.focus.horizon`  — prefixes and the NLL of the horizon after them
- :mod:`~megacontext.focus.lens`     — LensNet's input for a window and its scores
- :mod:`~megacontext.focus.trace`    — :class:`FocusTrace`: swap rate, residency, actions
- :mod:`~megacontext.focus.policies` — the policies, :func:`focus_window`, :func:`refocus`
"""
