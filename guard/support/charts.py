"""Charts for people who read charts: matplotlib figures as SVG to inline in a page.

The review pages send a CSP without scripts and without inline styles (only a nonced <style>),
so an inlined chart must draw with presentation attributes alone: `svg(figure, prefix)` turns
matplotlib's `style="fill: #..."` into `fill="#..."`, drops its <style>, metadata, anything
scriptable (scripts, foreignObject, on* handlers, links out of the document), and prefixes ids so
that several charts can share a page. Text stays text (`svg.fonttype: none`): searchable,
selectable, and what the tests read.

Colours are fixed per decision (as in the pages' CSS) and per category (the shipped categories
by name, any other by a hash of its name), so a category has one colour on every chart.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SVG_NS, XLINK_NS = "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)

DECISION_COLOURS = {"passed": "#1f7a3d", "edited": "#a36100", "refused": "#b3261e",
                    "failed": "#6b2fa3"}
ACTION_COLOURS = {"pass": "#1f7a3d", "edit": "#a36100", "refuse": "#b3261e", "allow": "#5f6b7a"}
_CATEGORY_COLOURS = {"sexual": "#c2185b", "violence": "#d84315", "self_harm": "#6a1b9a",
                     "shocking": "#4e342e", "hate": "#b71c1c", "harassment": "#f9a825",
                     "illegal": "#283593", "minors": "#00838f"}
_SPARE = ("#2e7d32", "#1565c0", "#ad1457", "#ef6c00", "#00695c", "#5d4037", "#455a64",
          "#7b1fa2", "#9e9d24", "#0277bd")
_STYLE_PROPERTIES = frozenset({
    "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-opacity",
    "stroke-linejoin", "stroke-linecap", "stroke-dasharray", "stroke-dashoffset",
    "stroke-miterlimit", "opacity", "font-size", "font-family", "font-weight", "font-style",
    "text-anchor", "dominant-baseline", "clip-path"})
_DROPPED = {f"{{{SVG_NS}}}{name}" for name in ("script", "foreignObject", "metadata", "style",
                                                "a", "iframe", "image")}
_RC: dict[str, Any] = {"svg.fonttype": "none", "svg.hashsalt": "safeedit", "font.family": "sans-serif",
       "font.sans-serif": ["DejaVu Sans"], "font.size": 10.0, "axes.titlesize": 12.0,
       "axes.titleweight": "bold", "axes.spines.top": False, "axes.spines.right": False}
# matplotlib's rcParams are global: charts are drawn one at a time (a few ms each).
_lock = threading.Lock()


def category_colour(name: str) -> str:
    if name in _CATEGORY_COLOURS:
        return _CATEGORY_COLOURS[name]
    return _SPARE[hashlib.sha256(name.encode()).digest()[0] % len(_SPARE)]


def render(draw: Callable[[Figure], Any], prefix: str, title: str, width: float = 7.0,
           height: float = 3.4) -> str:
    """Draw with `draw(figure)` under the charts' settings (size in inches, 72 points each) and
    return the figure as inline SVG, safe under a CSP without scripts or style attributes."""
    out = io.StringIO()
    # matplotlib is imported on the first chart, not when the proxy starts (it is large, and
    # only the dashboard and calibration reports draw); Figure needs no GUI backend.
    import matplotlib
    from matplotlib.figure import Figure

    with _lock, matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        fig = Figure(figsize=(width, height), layout="constrained")
        draw(fig)
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    return clean_svg(out.getvalue(), prefix, title)


def clean_svg(text: str, prefix: str, title: str = "") -> str:
    root = ET.fromstring(text)
    _strip(root)
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    for el in root.iter():
        for name, value in list(el.attrib.items()):
            if name == "id":
                el.set(name, f"{prefix}-{value}")
            elif name in ("href", f"{{{XLINK_NS}}}href"):
                ref = value[1:] if value.startswith("#") else None
                if ref in ids:
                    el.set(name, f"#{prefix}-{ref}")
                else:
                    del el.attrib[name]
            elif "url(#" in value:
                el.set(name, re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", value))
    root.attrib.pop("width", None)
    root.attrib.pop("height", None)
    root.set("class", "chart")
    root.set("role", "img")
    root.set("stroke-linejoin", "round")
    root.set("stroke-linecap", "butt")
    if title:
        root.set("aria-label", title)
        label = ET.Element(f"{{{SVG_NS}}}title")
        label.text = title
        root.insert(0, label)
    return ET.tostring(root, encoding="unicode")


def _strip(el: ET.Element) -> None:
    for child in list(el):
        if child.tag in _DROPPED:
            el.remove(child)
        else:
            _strip(child)
    for name in list(el.attrib):
        if name.lower().startswith("on"):
            del el.attrib[name]
    style = el.attrib.pop("style", None)
    if style:
        for part in style.split(";"):
            prop, _, value = part.partition(":")
            prop, value = prop.strip().lower(), value.strip()
            if prop in _STYLE_PROPERTIES and value and "url(" not in value.replace(
                    "url(#", ""):
                el.set(prop, value)
