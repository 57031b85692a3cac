"""Wording and formatting every page shares: names shown as typed, short names, model names
and times, and the look of the charts (the product's colours, log axes).

Pure functions and constants: nothing here draws or reads the session.
"""

from __future__ import annotations

import html
import re
import string
from collections.abc import Iterable
from pathlib import Path

from core.schema.contract import ModelFolder
from core.schema.files import repo_relative

BRAND = "#8e244d"  # the product's colour: Parasitized, the default, the chosen
PALETTE = (BRAND, "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd")  # one colour per compared run
# log axes: a labelled tick at each power of ten, unlabelled ones at 2 and 5 between them
LOG_AXIS = dict(
    type="log",
    dtick=1,
    tickformat=".0e",
    showgrid=True,
    minor=dict(dtick="D2", ticks="outside", showgrid=True, gridcolor="#f0f0f0"),
)

POINTING = {  # a Parasitized map's pointing check (Explanation.points_at_parasite), in short
    True: "✔ peak on the parasite",
    False: "✘ peak off the parasite",
    None: "no parasite located",
}

# every ASCII punctuation mark but "/", which Markdown gives no meaning alone (paths stay readable)
_MARKDOWN_SPECIAL = re.compile("([" + re.escape(string.punctuation.replace("/", "")) + "])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain(text: object) -> str:
    """``text`` (a file name, a path, a message quoting one) shown as typed by the Markdown
    that st.error, st.caption and image captions render: every ASCII punctuation mark is
    backslash-escaped (CommonMark), so no name becomes an image fetched from a URL, a link,
    HTML, a colour directive or formatting; control characters show as their symbols."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
    return _CONTROL.sub(
        lambda m: chr(0x2421 if m.group() == "\x7f" else 0x2400 + ord(m.group())), escaped
    )


def short_name(name: str, length: int = 30) -> str:
    """``name`` in at most ``length`` characters, its end kept: NIH names differ in their
    last part (``C123P84ThinF_IMG_2015…_cell_197.png``)."""
    if len(name) <= length:
        return name
    head = length // 3
    return f"{name[:head]}…{name[-(length - head - 1) :]}"


def chart_text(values: Iterable[object]) -> list[str]:
    """Labels for Plotly, which renders <a href>, <b>... in labels: HTML-escaped, shown as
    typed."""
    return [html.escape(str(v)) for v in values]


def model_label(folder: Path | str) -> str:
    """A model folder as the sidebar names it: relative to the repository where it can be."""
    return repo_relative(folder)


def trained_on(model: ModelFolder) -> str:
    """What a model learnt from, in one line ('' where its card does not say)."""
    if not model.training_data:
        return ""
    data = ", ".join(Path(d).name for d in model.training_data)
    line = f"Trained on {data}; {len(model.split['train'])} training patients"
    adapted = model.card.get("adaptation")
    if adapted:
        line += (
            f"; then adapted to a lab on {adapted['fields']} fields ({adapted['cells']:,} cells, "
            f"{adapted['infected_cells']} infected)"
        )
    return line


def minutes(iso: str) -> str:
    """An ISO 8601 time (``2026-11-26T23:43:52+00:00``) to the minute: ``2026-11-26 23:43``."""
    return iso[:16].replace("T", " ")


def share_text(share: float, low: float, high: float, n: int) -> str:
    """``63.1% (59.6–66.5%) of 750``: a share with its 95% interval and count, never "nan"
    (a share of none: every map flat)."""
    if share != share:
        return f"none (every map flat) of {n:,}"
    return f"{share:.1%} ({100 * low:.1f}–{high:.1%}) of {n:,}"
