"""`smtpgate stats`: the daemon's STATS (docs/protocol.md) for people.

STATS gains keys over time (each helper's section, `limits`, `webhooks`):
the known ones get their own lines, any other is printed as "name: key
value ..." so that nothing the daemon reports is hidden.
"""

from __future__ import annotations

from smtpgate.tools.terminal import escaped

_SHOWN = {"version", "protocol", "uptime", "states", "counters", "intake", "spool", "callers", "upstreams"}


def _pairs(values: dict, prefix: str = "") -> str:
    """"a 1  b 2", nested objects flattened as "b.c 3"."""
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):
            parts.append(_pairs(value, f"{prefix}{key}.") or f"{prefix}{key} -")
        else:
            parts.append(f"{prefix}{key} {value}")
    return "  ".join(part for part in parts if part)


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h {minutes} min" if days else f"{hours} h {minutes} min"


def format_stats(stats: dict) -> str:
    lines = [f"smtpgate {stats.get('version', '?')} (protocol {stats.get('protocol', '?')}), "
             f"up {_duration(stats.get('uptime', 0))}"]
    rows = [("messages now", _pairs(stats.get("states", {}))),
            ("since start", _pairs(stats.get("counters", {})))]
    intake = stats.get("intake")
    if intake:
        rows.append(("intake", _pairs(intake)))
    spool = stats.get("spool")
    if spool:
        per_commit = spool["operations"] / spool["commits"] if spool.get("commits") else 0
        rows.append(("spool", f"{spool.get('commits', 0)} commits, {per_commit:.1f} operations a commit"))
    rows += [(key, _pairs(value) if isinstance(value, dict) else str(value))
             for key, value in stats.items() if key not in _SHOWN]
    width = max(len(name) for name, _ in rows) + 1
    lines += [f"{name + ':':<{width}} {text}" for name, text in rows]
    callers = stats.get("callers") or {}
    if callers:
        lines.append("callers:")
        name_width = max(len(name) for name in callers)
        lines += [f"  {name:<{name_width}}  {_pairs(values)}" for name, values in callers.items()]
    upstreams = stats.get("upstreams")
    if upstreams is not None:
        lines.append("upstreams:" if upstreams else "upstreams: none (delivery is on hold)")
        for u in upstreams:
            line = f"  {u['name']}  {u['state']} since {u.get('since', '?')}"
            if u["state"] == "down":
                line += (f"  ({escaped(u.get('reason', ''))}); {u.get('failures', 0)} failures, "
                         f"next probe {u.get('next_probe', '?')}, {u.get('waiting', 0)} waiting")
            lines.append(line)
    return "\n".join(lines)
