"""The review pages' Jinja2 templates, kept in Python so that the package needs no data files.
Autoescaping is on for every template: prompts, thoughts and judge output are untrusted text.
The one value marked `safe` is our own constant `CSS` (escaped, its quoted font names broke)."""

from __future__ import annotations

import datetime as dt

from jinja2 import DictLoader, Environment, select_autoescape

CSS = """
:root { --fg:#1d2430; --muted:#5f6b7a; --line:#d9dee5; --bg:#f6f7f9; --card:#fff;
        --passed:#1f7a3d; --edited:#a36100; --refused:#b3261e; --failed:#6b2fa3; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { display:flex; gap:1rem; align-items:center; padding:.6rem 1.2rem;
         background:#1d2430; color:#fff; }
header a { color:#fff; text-decoration:none; font-weight:600; }
header .who { margin-left:auto; color:#c9d1db; }
header button { background:none; border:1px solid #8a96a6; color:#fff; border-radius:4px;
                padding:.2rem .6rem; cursor:pointer; }
main { padding:1rem 1.2rem; }
h1 { font-size:1.3rem; margin:.2rem 0 1rem; } h2 { font-size:1.1rem; margin:1.4rem 0 .6rem; }
form.inline { display:inline; margin:0; }
.filters { display:flex; flex-wrap:wrap; gap:.6rem 1rem; align-items:flex-end;
           background:var(--card); border:1px solid var(--line); border-radius:6px;
           padding:.8rem; margin-bottom:1rem; }
.filters label { display:flex; flex-direction:column; font-size:12px; color:var(--muted); }
.filters input, .filters select { font:inherit; padding:.25rem .4rem; min-width:9rem; }
table { border-collapse:collapse; width:100%; background:var(--card); }
th, td { text-align:left; padding:.35rem .6rem; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
code, .mono { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:12px; }
.badge { display:inline-block; padding:0 .45rem; border-radius:9px; color:#fff;
         font-size:12px; font-weight:600; }
.badge.passed { background:var(--passed); } .badge.edited { background:var(--edited); }
.badge.refused { background:var(--refused); } .badge.failed { background:var(--failed); }
.pager { margin:.8rem 0; display:flex; gap:1rem; }
.meta { display:grid; grid-template-columns:max-content 1fr; gap:.2rem 1rem;
        background:var(--card); border:1px solid var(--line); border-radius:6px; padding:.8rem; }
.meta dt { color:var(--muted); } .meta dd { margin:0; overflow-wrap:anywhere; }
.note { background:#fff7e0; border:1px solid #e8cf86; padding:.4rem .6rem; border-radius:4px; }
.error { background:#fde8e6; border:1px solid #e3a29c; padding:.4rem .6rem; border-radius:4px; }
.slot { margin-bottom:1.2rem; }
/* A slot's rounds side by side across the width, each image beside its refined successor. */
.rounds { display:grid; grid-auto-flow:column; grid-auto-columns:minmax(22rem, 1fr); gap:.8rem;
          overflow-x:auto; padding-bottom:.4rem; }
.round { min-width:0; background:var(--card); border:1px solid var(--line);
         border-radius:6px; padding:.7rem; }
.round .from { margin:0; font-size:12px; color:var(--muted); }
.round.unsafe { border-color:var(--refused); box-shadow:inset 0 3px 0 var(--refused); }
.round.safe { box-shadow:inset 0 3px 0 var(--passed); }
.round h3 { margin:0 0 .5rem; font-size:1rem; display:flex; justify-content:space-between; }
.thumb { display:flex; align-items:center; justify-content:center; height:16rem;
         background:#eef0f3; border-radius:4px; margin-bottom:.5rem; overflow:hidden; }
.thumb img { max-width:100%; max-height:100%; }
.thumb .none { color:var(--muted); font-size:12px; text-align:center; padding:.5rem; }
.field { margin:.4rem 0; } .field b { display:block; font-size:12px; color:var(--muted); }
.field p { margin:.1rem 0; white-space:pre-wrap; overflow-wrap:anywhere; }
.scores td, .scores th { padding:.15rem .3rem; font-size:12px; white-space:nowrap; }
.scores td:first-child { white-space:normal; }
table.list td { font-size:13px; } table.list .when, table.list .policy { white-space:nowrap; }
.prompt-cell { min-width:14rem; max-width:30rem; overflow-wrap:anywhere; }
.trace-id { font-size:11px; display:inline-block; max-width:9.5rem; overflow:hidden;
            text-overflow:ellipsis; white-space:nowrap; vertical-align:bottom; }
table.list .endpoint, table.list .model { white-space:nowrap; } .filters .words input { min-width:18rem; }
.scores tr.crossed td { color:var(--refused); font-weight:600; }
meter { width:4.5rem; }
.login { max-width:24rem; margin:3rem auto; background:var(--card); padding:1.4rem;
         border:1px solid var(--line); border-radius:6px; }
.login input { width:100%; font:inherit; padding:.4rem; margin:.3rem 0 .8rem; }
.login button, .filters button { font:inherit; padding:.35rem .9rem; cursor:pointer; }
.charts { display:grid; grid-template-columns:repeat(auto-fit, minmax(34rem, 1fr)); gap:1rem; }
.charts figure { margin:0; background:var(--card); border:1px solid var(--line);
                 border-radius:6px; padding:.6rem; }
.charts figcaption { font-size:12px; color:var(--muted); margin-top:.3rem; }
svg.chart { width:100%; height:auto; display:block; }
.totals { display:flex; gap:1.4rem; flex-wrap:wrap; margin:0 0 1rem; }
.totals b { font-size:1.4rem; display:block; }
.labels { margin:.5rem 0 0; border-top:1px solid var(--line); padding-top:.4rem; }
.labels p { margin:.15rem 0; font-size:12px; overflow-wrap:anywhere; }
.labels p.superseded { color:var(--muted); text-decoration:line-through; }
.labels .verdict { font-weight:600; }
form.label-form { display:grid; grid-template-columns:1fr 1fr; gap:.3rem .5rem; font-size:12px;
                  margin-top:.4rem; }
form.label-form label { display:flex; flex-direction:column; color:var(--muted); }
form.label-form .wide { grid-column:1 / -1; }
form.label-form select, form.label-form textarea, form.label-form button { font:inherit; }
.left { font-size:1rem; margin:.2rem 0 1rem; }
"""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}Audit review{% endblock %} · SafeEdit Guard</title>
<style nonce="{{ nonce }}">{{ css | safe }}</style></head>
<body><header><a href="/guard/">SafeEdit Guard · audit review</a>
{% if session %}<a href="/guard/dashboard">Dashboard</a>{% endif %}
{% if session %}<a href="/guard/queue">Review queue</a>{% endif %}
{% if session %}<a href="/guard/policies">Policies</a>{% endif %}
{% if session %}<span class="who">{{ session.principal.key_id }} · {{ session.principal.role }}
 · tenant {{ session.principal.tenant }}</span>
<form class="inline" method="post" action="/guard/logout">
<input type="hidden" name="csrf" value="{{ csrf }}"><button type="submit">Sign out</button></form>
{% endif %}</header>
<main>{% block main %}{% endblock %}</main></body></html>"""

LOGIN = """{% extends "base.html" %}{% block title %}Sign in{% endblock %}
{% block main %}<form class="login" method="post" action="/guard/login">
<h1>Sign in to review traces</h1>
{% if message %}<p class="error" role="alert">{{ message }}</p>{% endif %}
<label for="key">Auditor API key</label>
<input id="key" name="key" type="password" autocomplete="off" required autofocus>
<input type="hidden" name="csrf" value="{{ login_csrf }}">
<button type="submit">Sign in</button>
<p class="mono">The key is checked once; the browser keeps only a signed session cookie.</p>
</form>{% endblock %}"""

LIST = """{% extends "base.html" %}{% from "rows.html" import filter_fields, head, row %}
{% block title %}Traces{% endblock %}
{% block main %}<h1>Traces{% if session.principal.role != 'admin' %} · tenant
 {{ session.principal.tenant }}{% endif %}</h1>
<form class="filters" method="get" action="/guard/">
{{ filter_fields(f, session, decisions, categories, endpoints) }}
<label>From (UTC)<input type="datetime-local" step="1" name="since" value="{{ f.since }}"></label>
<label>Until (UTC)<input type="datetime-local" step="1" name="until" value="{{ f.until }}"></label>
<button type="submit">Filter</button> <a href="/guard/">Clear</a>
</form>
{% if message %}<p class="error" role="alert">{{ message }}</p>{% endif %}
{% set admin = session.principal.role == 'admin' %}
{% if items %}<table id="traces" class="list">{{ head(admin, true) }}<tbody>
{% for t in items %}{{ row(t, admin, true) }}{% endfor %}</tbody></table>
{% else %}<p>No traces match these filters.</p>{% endif %}
<div class="pager">{% if f.cursor %}<a href="?{{ first_query }}">Newest</a>{% endif %}
{% if next_query %}<a id="older" href="?{{ next_query }}">Older traces</a>{% endif %}</div>
{% endblock %}"""

# The list's and the queue's filter fields and rows (one trace summary a row).
ROWS = """{% macro filter_fields(f, session, decisions, categories, endpoints) %}
<label class="words">Prompt words<input type="search" name="q" value="{{ f.q }}"
 placeholder="every word begins a word of the prompt"></label>
<label>Decision<select name="decision"><option value="">any</option>
{% for d in decisions %}<option{% if f.decision == d %} selected{% endif %}>{{ d }}</option>
{% endfor %}</select></label>
<label>Category<select name="category"><option value="">any</option>
{% for c in categories %}<option{% if f.category == c %} selected{% endif %}>{{ c }}</option>
{% endfor %}</select></label>
<label>Endpoint<select name="endpoint"><option value="">any</option>
{% for e in endpoints %}{% set short = e.split("/")[-1] %}<option value="{{ short }}"
{%- if f.endpoint in (e, short) %} selected{% endif %}>{{ short }}</option>
{% endfor %}</select></label>
{% if session.principal.role == 'admin' %}<label>Tenant<input name="tenant" value="{{ f.tenant }}"></label>{% endif %}
<label>Key id<input name="key_id" value="{{ f.key_id }}"></label>
<label>Policy<input name="policy" value="{{ f.policy }}"></label>
<label>Version<input name="policy_version" inputmode="numeric" value="{{ f.policy_version }}"></label>
<label>Model<input name="model" value="{{ f.model }}"></label>
{% endmacro %}
{% macro head(admin, timing) %}<thead><tr><th>Time (UTC)</th><th>Trace</th><th>Decision</th><th>Prompt</th>
<th>Endpoint</th><th>Model</th><th>Categories</th>{% if admin %}<th>Tenant</th>{% endif %}
<th>Key</th><th>Policy</th>{% if timing %}<th class="num">Rounds</th><th class="num">ms</th>
<th class="num">Status</th>{% endif %}</tr></thead>{% endmacro %}
{% macro row(t, admin, timing) %}<tr>
<td class="mono when">{{ t.created_at | utc }}</td>
<td><a class="mono trace-id" title="{{ t.id }}" href="/guard/traces/{{ t.id | urlencode }}">{{ t.id }}</a></td>
<td><span class="badge {{ t.decision }}">{{ t.decision }}</span></td>
<td class="prompt-cell" title="{{ t.prompt or '' }}">{{ (t.prompt or "") | truncate(90, true, "…", 0) }}</td>
<td class="endpoint">{{ (t.endpoint or "").split("/")[-1] }}</td>
<td class="model">{{ t.model or "" }}</td><td class="cats">{{ t.categories | join(", ") }}</td>
{% if admin %}<td>{{ t.tenant or "" }}</td>{% endif %}<td>{{ t.key_id or "" }}</td>
<td class="policy">{% if t.policy.id %}{{ t.policy.id }} v{{ t.policy.version }}{% else %}–{% endif %}</td>
{% if timing %}<td class="num">{{ t.rounds }}</td><td class="num">{{ "%.0f" | format(t.duration_ms) }}</td>
<td class="num">{{ t.status }}</td>{% endif %}</tr>
{% endmacro %}"""

TRACE = """{% extends "base.html" %}{% block title %}{{ t.id }}{% endblock %}
{% macro scores(j) %}<table class="scores"><thead><tr><th>Category</th><th class="num">Score</th>
<th></th><th class="num">Threshold</th></tr></thead><tbody>
{% for name, score in j.scores | dictsort(by="value", reverse=true) %}
{% set th = thresholds.get(name) %}
<tr class="{{ 'crossed' if name in j.flagged else '' }}" data-category="{{ name }}">
<td>{{ name }}{% if name in j.flagged %} ✖{% endif %}</td><td class="num">{{ "%.3f" | format(score) }}</td>
<td><meter min="0" max="1" value="{{ score }}"{% if th %} high="{{ th.threshold }}"{% endif %}></meter></td>
<td class="num">{% if th %}{{ "%.2f" | format(th.threshold) }} {{ th.action }}{% else %}–{% endif %}</td></tr>
{% else %}<tr><td colspan="4">no scores</td></tr>{% endfor %}</tbody></table>{% endmacro %}
{% macro card(r, j, label) %}
<article class="round {{ 'unsafe' if j.flagged else 'safe' }}" data-round="{{ r.index }}">
<h3><span>{{ label }}</span><span class="mono">{{ j.action }}</span></h3>
{% if r.kind != "prescreen" %}<div class="thumb">
{% if j.image_sha256 and j.image_sha256 in images.shown %}
<a href="{{ image_url(j.image_sha256) }}"><img alt="round {{ r.index }} image"
 src="{{ image_url(j.image_sha256) }}?size=thumb"></a>
{% elif j.image_sha256 %}<div class="none absent">{{ images.absent[j.image_sha256] }}<br>
<code>sha256 {{ j.image_sha256[:16] }}…</code></div>
{% else %}<div class="none">no image</div>{% endif %}</div>{% endif %}
{% if j.refined_by %}<p class="from">made from the prompt refined by {{ j.refined_by }}</p>{% endif %}
<div class="field"><b>Prompt</b><p class="prompt">{{ j.prompt }}</p></div>
{{ scores(j) }}
{% if j.unassessed %}<p class="unassessed mono">not assessed on the {{ "prompt" if r.kind == "prescreen" else "image" }}:
{% for name, how in j.unassessed | dictsort %} {{ name }} ({{ {"prompt": "the prompt's verdict stood",
"refuse": "refused", "pass": "passed", "image": "left to the image"}.get(how, how) }}){{ "," if not loop.last }}{% endfor %}</p>{% endif %}
{% if j.thought %}<div class="field"><b>Thought</b><p class="thought">{{ j.thought }}</p></div>{% endif %}
{% if j.refined_prompt %}<div class="field"><b>Refined prompt</b>
<p class="refined">{{ j.refined_prompt }}</p></div>{% endif %}
<div class="field"><b>Judge · timings</b><p class="mono">{{ j.judge_id }} · judge {{ "%.1f" | format(j.judge_ms) }} ms
{%- if r.kind != "prescreen" %} · {{ r.kind }}: backend {{ "%.1f" | format(r.backend_ms) }} ms{% if r.backend %} ({{ r.backend }}){% endif %}, judge {{ "%.1f" | format(r.judge_ms) }} ms{% endif %}</p></div>
{% if r.error %}<p class="error">{{ r.error }}</p>{% endif %}
{% for p in r.previews if p.slot == j.slot %}<p class="mono">preview {{ p.step }}: {{ p.action }}
{%- if p.flagged %} ({{ p.flagged | join(", ") }}){% endif %}{% if p.stopped %}, generation stopped here{% endif %}</p>{% endfor %}
{{ labels(none if r.kind == "prescreen" else j.slot, r.index) }}
</article>{% endmacro %}
{% macro labels(slot, index) %}<div class="labels" id="item-{{ 'prompt' if slot is none else slot }}-{{ index }}">
{% for lb, old in item_labels(slot, index) %}
<p class="label {{ 'superseded' if old else 'current' }}" data-verdict="{{ lb.verdict }}">
<span class="verdict">{{ lb.verdict | replace("_", " ") }}</span>{% if lb.category %} · {{ lb.category }}{% endif %}
 · {{ lb.key_id }} · {{ lb.created_at | utc }}{% if old %} · superseded{% endif %}
{% if lb.note %}<br><span class="label-note">{{ lb.note }}</span>{% endif %}</p>
{% endfor %}
{% if can_label %}<form class="label-form" method="post" action="/guard/traces/{{ t.id | urlencode }}/labels">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="slot" value="{{ '' if slot is none else slot }}">
<input type="hidden" name="round" value="{{ index }}">
<label>Verdict<select name="verdict" required><option value="" selected disabled>choose…</option>
{% for v in verdicts %}
<option value="{{ v }}">{{ v | replace("_", " ") }}</option>{% endfor %}</select></label>
<label>Category<select name="category"><option value="">–</option>
{% for c in label_categories %}<option>{{ c }}</option>{% endfor %}</select></label>
<label class="wide">Note<textarea name="note" rows="2" maxlength="{{ max_note }}"></textarea></label>
<button class="wide" type="submit">Save label</button></form>{% endif %}</div>{% endmacro %}
{% block main %}<h1>Trace <span class="mono">{{ t.id }}</span>
 <span class="badge {{ t.decision }}">{{ t.decision }}</span></h1>
<dl class="meta">
<dt>Time</dt><dd class="mono">{{ t.created_at | utc }}</dd>
<dt>Tenant · key</dt><dd>{{ t.tenant or "–" }} · {{ t.key_id or "–" }}</dd>
<dt>Endpoint · model · backend</dt><dd>{{ t.endpoint }} · {{ t.model or "–" }} · {{ t.backend or "–" }}</dd>
<dt>Policy</dt><dd id="policy">{% if t.policy.id %}{{ t.policy.id }} version {{ t.policy.version }}
 <code>sha256 {{ (t.policy.sha256 or "")[:16] }}…</code>{% else %}none: the request ended before
 a policy was chosen{% endif %}</dd>
<dt>Status · duration</dt><dd>{{ t.status }} · {{ "%.1f" | format(t.duration_ms) }} ms</dd>
{% if t.otel_trace_id %}<dt>OpenTelemetry trace</dt><dd class="mono" id="otel-trace">{{ t.otel_trace_id }}</dd>{% endif %}
<dt>Categories</dt><dd>{{ t.categories | join(", ") or "none" }}</dd>
<dt>Request prompt</dt><dd class="prompt">{{ t.request.get("prompt", "") }}</dd>
{% if t.error %}<dt>Error</dt><dd class="error">{{ t.error.status }} {{ t.error.code }}: {{ t.error.message }}</dd>{% endif %}
<dt>Chain</dt><dd class="mono">hash {{ t.hash }}<br>prev {{ t.prev_hash or "(first)" }}</dd>
</dl>
{% if policy_note %}<p class="note">{{ policy_note }}</p>{% endif %}
{% if prescreen %}<h2>Prescreen (prompt only)</h2><div class="rounds">
{% for j in prescreen.images %}{{ card(prescreen, j, "Prescreen") }}{% endfor %}
{% if prescreen.error %}<p class="error">{{ prescreen.error }}</p>{% endif %}</div>{% endif %}
{% for slot, cards in slots %}<section class="slot" data-slot="{{ slot }}">
<h2>Image {{ slot }}{% if results.get(slot) %} ·
 <span class="badge {{ results[slot].decision }}">{{ results[slot].decision }}</span>
 after {{ results[slot].rounds }} round(s){% endif %}</h2>
<div class="rounds">{% for r, j in cards %}{{ card(r, j, "Round " ~ r.index) }}{% endfor %}</div>
</section>{% endfor %}
{% for r in failed_rounds %}<p class="error">Round {{ r.index }}: {{ r.error }}</p>{% endfor %}
{% endblock %}"""

DASHBOARD = """{% extends "base.html" %}{% block title %}Dashboard{% endblock %}
{% block main %}<h1>Dashboard{% if session.principal.role != 'admin' %} · tenant
 {{ session.principal.tenant }}{% elif f.tenant %} · tenant {{ f.tenant }}{% endif %}</h1>
<form class="filters" method="get" action="/guard/dashboard">
<label>From (UTC; default 7 days ago)<input type="datetime-local" step="1" name="since" value="{{ f.since }}"></label>
<label>Until (UTC)<input type="datetime-local" step="1" name="until" value="{{ f.until }}"></label>
{% if session.principal.role == 'admin' %}<label>Tenant (all when empty)<input name="tenant" value="{{ f.tenant }}"></label>{% endif %}
<button type="submit">Show</button> <a href="/guard/dashboard">Last 7 days</a>
</form>
{% if message %}<p class="error" role="alert">{{ message }}</p>{% endif %}
{% if fig %}<p id="window">From {{ fig.since | utc }} to {{ fig.until | utc }} (UTC){% if fig.truncated %}:
 the newest {{ fig.total }} requests of this window only; choose a shorter window for all of them{% endif %}.</p>
{% if fig.total %}<div class="totals" id="totals"><div><b>{{ fig.total }}</b>requests</div>
{% for d in ("passed", "edited", "refused", "failed") %}<div><b class="badge {{ d }}">{{ fig.decisions[d] }}</b>{{ d }}</div>{% endfor %}
<div><b>{{ fig.labelled }}</b>labelled items</div></div>
<div class="charts">
{% for name, caption in captions %}{% if name in charts %}<figure id="chart-{{ name }}">{{ charts[name] | safe }}
<figcaption>{{ caption }}</figcaption></figure>{% endif %}{% endfor %}
</div>
{% if "labels" not in charts %}<p id="no-labels">No labelled items in this window: the false-positive and miss rates appear once reviewers label traces.</p>{% endif %}
{% else %}<p>No requests in this window.</p>{% endif %}{% endif %}
{% endblock %}"""

QUEUE = """{% extends "base.html" %}{% from "rows.html" import filter_fields, head, row %}
{% block title %}Review queue{% endblock %}
{% block main %}<h1>Review queue{% if session.principal.role != 'admin' %} · tenant
 {{ session.principal.tenant }}{% endif %}</h1>
<form class="filters" method="get" action="/guard/queue">
{{ filter_fields(f, session, decisions[:3], categories, endpoints) }}
<label>Passed sample (%)<input name="sample" inputmode="decimal" value="{{ f.sample }}"></label>
<button type="submit">Filter</button> <a href="/guard/queue">Clear</a>
</form>
{% if message %}<p class="error" role="alert">{{ message }}</p>{% else %}
<p class="left" id="left"><b>{{ page.total }}</b> left to label: {{ page.left.get("refused", 0) }}
 refused, {{ page.left.get("edited", 0) }} edited, {{ page.left.get("passed", 0) }} passed
 (a {{ f.sample }}% sample of the passed traces)</p>{% endif %}
{% set admin = session.principal.role == 'admin' %}
{% if page and page.items %}<table id="queue" class="list">{{ head(admin, false) }}<tbody>
{% for t in page.items %}{{ row(t, admin, false) }}{% endfor %}</tbody></table>
{% if page.total > page.items | length %}<p>The first {{ page.items | length }} are shown; label them to see more.</p>{% endif %}
{% elif not message %}<p>Nothing left to label here.</p>{% endif %}
{% endblock %}"""

MESSAGE = """{% extends "base.html" %}{% block title %}{{ title }}{% endblock %}
{% block main %}<h1>{{ title }}</h1><p>{{ message }}</p><p><a id="back" href="{{ back[0] }}">{{ back[1] }}</a></p>
{% endblock %}"""


CAPTIONS = (
    ("over_time", "Every request of the window by its decision: passed untouched, edited (made "
                  "again from a safer prompt), refused, or failed (an error)."),
    ("flags", "Each time a prompt or an image crossed a category's threshold, and what the "
              "guard did with that item."),
    ("rounds", "How many images the guard had made before it could answer: 1 is the first "
               "image, more means it was made again; none: refused from the prompt alone."),
    ("latency", "Half, nine in ten, and 99 in 100 of the calls finish within these times."),
    ("policies", "For each policy version in use: the share of its requests refused and "
                 "edited, with the counts."),
    ("labels", "From reviewers' labels: of the flagged items they looked at, how many were in "
               "fact fine (false positives); of the unsafe ones, how many passed (misses)."),
)


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def environment() -> Environment:
    env = Environment(
        loader=DictLoader({"base.html": BASE, "login.html": LOGIN, "list.html": LIST,
                           "trace.html": TRACE, "message.html": MESSAGE,
                           "dashboard.html": DASHBOARD, "queue.html": QUEUE,
                           "rows.html": ROWS}),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True, lstrip_blocks=True)
    env.filters["utc"] = _utc
    env.globals["css"] = CSS
    env.globals["captions"] = CAPTIONS
    return env
