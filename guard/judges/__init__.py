"""Judges: look at a prompt (and an image) and score it per policy category.

The contract (`Judge`, `Refiner`, `Explanation`) and the registry are in `guard.plugins`; the
built-ins here (`builtin`, `vlm`, `remote`, the composites `ensemble` and `cascade`) register from
its list through the same loader a third party uses (or the entry-point group `safeedit.judges`).
"""
