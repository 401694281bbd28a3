"""The policy history page for auditors and compliance officers: /guard/policies.

Every policy version the proxies sharing this audit store have served (its sha256, as traces
record it), when it was first loaded and by what (a start or a reload, on which replica), every
start and reload since, and the effective differences between any two versions (`?a=&b=`, the
words of `safeedit policy diff`). The data is guard.audit.policies'; the API twin is
`GET /v1/guard/policies/history`.
"""

from __future__ import annotations

from typing import Any

from jinja2 import DictLoader
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from guard import review
from guard.audit.policies import PolicyHistory
from guard.offline.explain import compare_versions

PAGE = """{% extends "base.html" %}{% block title %}Policy history{% endblock %}
{% block main %}<h1>Policy history</h1>
{% if message %}<p class="error" role="alert">{{ message }}</p>{% endif %}
<form class="filters" method="get" action="/guard/policies">
<label>policy<select name="policy"><option value="">all</option>
{% for pid in ids %}<option{% if pid == policy %} selected{% endif %}>{{ pid }}</option>{% endfor %}
</select></label>
<label>compare<select name="a" id="a"><option value="">version…</option>
{% for v in versions %}<option value="{{ v.sha256 }}"{% if v.sha256 == a %} selected{% endif %}>
{{ v.policy_id }} v{{ v.version }} · {{ v.sha256[:12] }}</option>{% endfor %}</select></label>
<label>with<select name="b" id="b"><option value="">version…</option>
{% for v in versions %}<option value="{{ v.sha256 }}"{% if v.sha256 == b %} selected{% endif %}>
{{ v.policy_id }} v{{ v.version }} · {{ v.sha256[:12] }}</option>{% endfor %}</select></label>
<button type="submit">Show</button></form>
{% if changes is not none %}<section id="diff"><h2>{{ label(a) }} → {{ label(b) }}</h2>
{% if changes %}<table class="list"><thead><tr><th>effect</th><th>difference</th></tr></thead>
<tbody>{% for c in changes %}<tr><td><span class="badge {{ {'stricter': 'refused',
'looser': 'edited'}.get(c.effect, 'passed') }}">{{ c.effect }}</span></td><td>{{ c.text }}</td>
</tr>{% endfor %}</tbody></table>
{% else %}<p>No effective difference.</p>{% endif %}</section>{% endif %}
<h2>Versions served</h2>
{% if versions %}<table class="list" id="versions"><thead><tr><th>policy</th><th class="num">
version</th><th>sha256</th><th>first loaded (UTC)</th><th>by</th><th>served by</th></tr></thead>
<tbody>{% for v in versions %}<tr><td>{{ v.policy_id }}</td><td class="num">{{ v.version }}</td>
<td><code title="{{ v.sha256 }}">{{ v.sha256[:16] }}</code></td><td class="when">
{{ v.first_at | utc }}</td><td>{{ v.first_by }}</td><td>{% for e in v.served[:4] %}
{{ e.event }} on {{ e.replica }}, {{ e.at | utc }}{% if not loop.last %}<br>{% endif %}
{% endfor %}{% if v.served | length > 4 %}<br>… {{ v.served | length - 4 }} more{% endif %}
</td></tr>{% endfor %}</tbody></table>
{% else %}<p>No policy version recorded yet.</p>{% endif %}
<h2>Starts and reloads</h2>
{% if events %}<table class="list" id="events"><thead><tr><th>when (UTC)</th><th>replica</th>
<th>event</th><th>policy</th><th>change</th><th class="num">version</th><th>sha256</th>
<th>detail</th></tr></thead><tbody>{% for e in events %}<tr><td class="when">{{ e.at | utc }}
</td><td>{{ e.replica }}</td><td>{{ e.event }}</td><td>{{ e.policy_id }}</td><td>{% if
e.change == "stale" %}<span class="badge refused">stale</span>{% else %}{{ e.change }}{% endif
%}</td><td class="num">{{ e.version if e.version is not none else "–" }}</td><td><code>{{
(e.sha256 or "")[:12] }}</code></td><td>{{ e.detail }}</td></tr>{% endfor %}</tbody></table>
{% else %}<p>No start or reload recorded yet.</p>{% endif %}
{% endblock %}"""


def routes() -> list[BaseRoute]:
    # The review pages' templates are one environment; this page's joins it (here, once the
    # package has finished importing: it imports this module).
    loader = review._env.loader
    assert isinstance(loader, DictLoader) and isinstance(loader.mapping, dict)
    loader.mapping.setdefault("policies.html", PAGE)
    return [Route("/guard/policies", policies_page, methods=["GET"])]


async def policies_page(request: Request) -> Response:
    session = review._sessions(request).current(request)
    if session is None:
        return review._to_login()
    history = PolicyHistory.of(review._state(request).store)
    if history is None:
        return review._message(request, 501, "Policy history",
                               "This audit store keeps no policy history.", session)
    params = request.query_params
    policy = params.get("policy") or None
    a, b = params.get("a") or "", params.get("b") or ""
    everything = await history.versions()
    versions = [v for v in everything if policy is None or v["policy_id"] == policy]
    context: dict[str, Any] = {"versions": versions, "events": await history.events(policy),
                               "ids": sorted({v["policy_id"] for v in everything}),
                               "policy": policy, "a": a, "b": b, "changes": None,
                               "message": ""}
    names = {v["sha256"]: f"{v['policy_id']} v{v['version']} ({v['sha256'][:12]})"
             for v in everything}
    status = 200
    if a and b:
        context["changes"] = await compare_versions(history, a, b)
        if context["changes"] is None:
            status, context["message"] = 404, "No such policy version in the history."
    elif a or b:
        status, context["message"] = 400, "Choose two versions to compare."
    return review._render(request, "policies.html", status, session,
                          label=lambda sha: names.get(sha, sha[:12]), **context)

