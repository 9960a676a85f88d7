"""The queue page's HTML: server-rendered, no JavaScript, every value
escaped (subjects, addresses and replies come from callers and upstreams,
so they are hostile text). The Content-Security-Policy of server.py forbids
scripts besides, should an escape ever be missed.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from smtpgate.spool.schema import FINAL_STATES

REFRESH = 10  # seconds between two loads of the list (meta refresh)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:60em;padding:.5em;color:#222}
h1{font-size:1.3em;margin:.3em 0}h2{font-size:1.1em;margin:1em 0 .3em}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.25em .4em;
border-bottom:1px solid #ddd;vertical-align:top;overflow-wrap:anywhere}
.id{font-family:monospace;font-size:.9em}.st{white-space:nowrap}
.counts{display:flex;flex-wrap:wrap;gap:.4em}.counts span{background:#eee;padding:.3em .6em;border-radius:.3em}
.down{color:#a00;font-weight:bold}.up{color:#070}.note{background:#ffd;padding:.4em}
.reply{color:#555;font-size:.9em}form.inline{display:inline}input[type=text],input[type=password]{width:14em}
button{padding:.3em .8em}nav{display:flex;justify-content:space-between;align-items:center}
"""


def _page(title: str, body: str, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH}">' if refresh else ""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"{meta}<title>{escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>")


def _hidden(csrf: str | None) -> str:
    return f'<input type=hidden name=csrf value="{escape(csrf)}">' if csrf else ""


def _header(who: str, csrf: str | None, logout: bool) -> str:
    out = (f'<nav><h1><a href="/">smtpgate</a></h1><span>{escape(who)}')
    if logout:
        out += (f' <form class=inline method=post action="/logout">{_hidden(csrf)}'
                "<button>Log out</button></form>")
    return out + "</span></nav>"


def _upstreams(upstreams: list[dict]) -> str:
    if not upstreams:
        return "<p>No upstream tried yet (or delivery is not running).</p>"
    rows = []
    for u in upstreams:
        state = u["state"]
        detail = ""
        if state == "down":
            detail = (f'<br><span class=reply>{escape(u["reason"])}; {_count(u["failures"], "failed try", "failed tries")}, '
                      f'next probe {escape(u["next_probe"])}, {_count(u["waiting"], "message")} waiting</span>')
        rows.append(f'<tr><td class=st>{escape(u["name"])}</td><td><span class="{escape(state)}">{escape(state)}</span> '
                    f'since {escape(u["since"])}{detail}</td></tr>')
    return "<table><tr><th>Upstream</th><th>State</th></tr>" + "".join(rows) + "</table>"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _last_reply(entry: dict) -> str:
    pending = [r for r in entry["recipients"] if r["state"] not in FINAL_STATES] or entry["recipients"]
    return next((r["reply"] for r in pending if r["reply"]), "") or ""


def _entries(entries: list[dict]) -> str:
    if not entries:
        return "<p>None.</p>"
    rows = []
    for m in entries:
        to = ", ".join(r["address"] for r in m["recipients"][:3])
        if len(m["recipients"]) > 3:
            to += f" and {len(m['recipients']) - 3} more"
        rows.append(
            f'<tr><td><a class=id href="/message/{quote(m["id"])}">{escape(m["id"])}</a><br>'
            f'<small>{escape(m["created"])}</small></td><td class=st>{escape(m["state"])}<br>'
            f'<small>{_count(m["attempts"], "attempt")}</small></td><td>{escape(to)}<br>'
            f'<span class=reply>{escape(_last_reply(m))}</span></td></tr>')
    return ("<table><tr><th>Message</th><th>State</th><th>To, last reply</th></tr>"
            + "".join(rows) + "</table>")


def index(*, who: str, csrf: str | None, logout: bool, states: dict, upstreams: list[dict],
          oldest: list[dict], query: str | None, found: list[dict] | None, notice: str | None) -> str:
    counts = "".join(f"<span>{escape(state)} <b>{n}</b></span>" for state, n in states.items())
    body = _header(who, csrf, logout)
    if notice:
        body += f"<p class=note>{escape(notice)}</p>"
    body += (f"<div class=counts>{counts}</div>"
             '<form method=get action="/"><p><label>Find an id or recipient '
             f'<input type=text name=q value="{escape(query or "")}" minlength=3 maxlength=320></label> '
             "<button>Find</button></p></form>")
    if found is not None:
        body += f"<h2>Found for {escape(query)}</h2>" + _entries(found)
    body += "<h2>Upstreams</h2>" + _upstreams(upstreams)
    body += f"<h2>Oldest waiting ({len(oldest)} shown)</h2>" + _entries(oldest)
    return _page("smtpgate queue", body, refresh=found is None)


def detail(*, who: str, csrf: str | None, logout: bool, entry: dict, subject: str | None,
           route: list[str], may_change: bool, notice: str | None) -> str:
    m = entry
    body = _header(who, csrf, logout)
    if notice:
        body += f"<p class=note>{escape(notice)}</p>"
    rows = [("Id", m["id"]), ("State", m["state"]), ("Subject", subject if subject is not None else "(none)"),
            ("From", m["from"]), ("Caller", m["caller"]), ("Attempts", str(m["attempts"])),
            ("Created", m["created"]), ("Updated", m["updated"])]
    if "next_attempt" in m:
        rows.append(("Next attempt", m["next_attempt"]))
    if m.get("possible_duplicate"):
        rows.append(("Possible duplicate", "yes: an attempt was cut after its final dot"))
    rows.append(("Route", ", ".join(route) or "(no upstream)"))
    body += "<table>" + "".join(f"<tr><th>{k}</th><td>{escape(v)}</td></tr>" for k, v in rows) + "</table>"
    body += "<h2>Recipients</h2><table><tr><th>Address</th><th>State</th><th>Last reply</th></tr>"
    body += "".join(f'<tr><td>{escape(r["address"])}</td><td>{escape(r["state"])}</td>'
                    f'<td class=reply>{escape(r["reply"] or "")}</td></tr>' for r in m["recipients"])
    body += "</table>"
    if may_change:
        action = f"/message/{quote(m['id'])}"
        body += "<p>"
        if m["state"] not in FINAL_STATES:
            body += (f'<form class=inline method=post action="{action}/retry">{_hidden(csrf)}'
                     "<button>Retry now</button></form> ")
        body += (f'<form class=inline method=post action="{action}/delete">{_hidden(csrf)}'
                 "<button>Delete</button></form></p>")
    return _page(f"smtpgate {m['id']}", body)


def login(error: str | None) -> str:
    body = "<nav><h1>smtpgate</h1></nav>"
    if error:
        body += f"<p class=note>{escape(error)}</p>"
    body += ('<form method=post action="/login"><p><label>Token '
             '<input type=password name=token autocomplete=current-password maxlength=512></label> '
             "<button>Log in</button></p></form>"
             "<p>An admin token (http_admin_token_file) or a caller's token.</p>")
    return _page("smtpgate: log in", body)


def message_page(title: str, text: str) -> str:
    return _page(title, f'<nav><h1><a href="/">smtpgate</a></h1></nav><p>{escape(text)}</p>')
